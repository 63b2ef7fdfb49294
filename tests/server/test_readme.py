"""Every example in the README works as written against a live server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real or tiny model weights, kernel builds or servers

README = Path(__file__).resolve().parents[2] / "README.md"
DOC_URL = "http://127.0.0.1:8000"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_setup_is_exactly_two_commands():
    setup = README.read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```bash\n(.*?)```", setup, flags=re.S) == ["make serve\n", "make test\n"]


CURLS = [block.strip() for block in code_blocks("bash") if block.startswith("curl")]


def test_readme_has_curl_examples():
    assert len(CURLS) == 3


@pytest.mark.parametrize("command", CURLS, ids=["chat", "stream", "completions"])
def test_curl_example(server, command):
    command = command.replace(DOC_URL, server.base_url)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    if '"stream": true' in command:
        events = [line[len("data: "):] for line in result.stdout.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text.strip()
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    else:
        body = json.loads(result.stdout)
        choice = body["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert text.strip() and body["usage"]["completion_tokens"] > 0


def test_python_sdk_example(server, tmp_path):
    (example,) = code_blocks("python")
    script = tmp_path / "example.py"
    script.write_text(example.replace(DOC_URL, server.base_url))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) >= 2  # the reply, then the streamed count
