"""The serving benchmark end to end: benchmarks/serve.py launches Kestrel, drives it, stops it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow  # real or tiny model weights, kernel builds or servers

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE = REPO_ROOT / "benchmarks" / "serve.py"
PROMPTS = REPO_ROOT / "benchmarks" / "prompts_v1.json"


def test_prompt_set_is_well_formed() -> None:
    data = json.loads(PROMPTS.read_text())
    assert (data["name"], data["version"]) == ("prompts_v1", 1)
    conversations, kinds = data["conversations"], data["kinds"]
    assert len(conversations) == len(kinds) == 64
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        "short": 36,
        "medium": 20,
        "long": 8,
    }
    for conversation in conversations:
        assert conversation[-1]["role"] == "user"
        assert all(
            m["role"] in {"system", "user", "assistant"} and m["content"] for m in conversation
        )


@pytest.fixture(scope="module")
def report(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "report.json"
    args = ["--model", str(default_model_dir), "--concurrency", "2", "--num-prompts", "4",
            "--max-tokens", "8", "--json", str(out)]  # fmt: skip
    command = [sys.executable, str(SERVE), *args]
    proc = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TTFT p50 (ms)" in proc.stdout and "c=2" in proc.stdout, proc.stdout
    return json.loads(out.read_text())


def test_benchmark_reports_every_figure_without_errors(report: dict) -> None:
    assert report["prompt_set"]["num_conversations"] == 64
    (server,) = report["servers"]
    assert server["name"] == "kestrel" and server["warmup_error"] is None
    (level,) = server["levels"]
    assert (level["concurrency"], level["num_requests"]) == (2, 4)
    assert (level["completed"], level["errors"], level["first_error"]) == (4, 0, None)
    assert 0 < level["output_tokens"] <= 4 * 8 and level["prompt_tokens"] > 0
    for key in ("request_throughput", "output_throughput", "total_throughput", "duration_s"):
        assert level[key] > 0, key
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_s"):
        figures = level[key]
        assert 0 < figures["p50"] <= figures["p90"] <= figures["p99"], (key, figures)


def test_benchmark_stops_the_server_it_started(report: dict) -> None:
    (server,) = report["servers"]
    assert server["exit_code"] is None  # alive throughout the run
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server['url']}/health", timeout=2.0, trust_env=False)
