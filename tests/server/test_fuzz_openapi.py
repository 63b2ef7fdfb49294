"""Schemathesis fuzzes every operation of /openapi.json on a real server: no 5xx, every error in
the OpenAI envelope, status codes, content types and bodies as the document describes them.

Runs Schemathesis's own CLI (`st run`, its stable interface; its pytest loader does not run under
pytest 9) with its coverage, fuzzing and stateful phases, a bounded number of examples per
operation and a fixed seed, so `make test` is repeatable. A deeper campaign:
KESTREL_FUZZ_EXAMPLES=1000 KESTREL_FUZZ_SEED=$RANDOM pytest -q tests/server/test_fuzz_openapi.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.sampling_params import MAX_N

from .conftest import ServerProcess, start_server

MAX_EXAMPLES = int(os.environ.get("KESTREL_FUZZ_EXAMPLES", "100"))  # per operation
SEED = int(os.environ.get("KESTREL_FUZZ_SEED", "14"))
HOOKS = Path(__file__).with_name("fuzz_hooks.py")  # the OpenAI error envelope check
ST_TIMEOUT_S = 600

# What a fuzzed request can make the model do, bounded by the server's settings rather than by
# narrowing the schema: a 96-token context caps every sequence, 4 prompts per call at most.
FUZZ_SERVER_ARGS = (
    "--max-model-len", "96",
    "--kv-cache-memory", "64MiB",
    "--default-max-tokens", "8",
    "--max-prompts", "4",
    "--max-waiting", "8",
    "--grammar-compile-timeout", "2",
)  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_server(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = start_server(default_model_dir, tmp_path_factory.mktemp("fuzz"), *FUZZ_SERVER_ARGS)
    yield proc
    assert proc.terminate() == 0, proc.log()[-4000:]


def test_openapi_fuzz(fuzz_server: ServerProcess, tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("st")
    cmd = [
        str(st), "run", f"{fuzz_server.base_url}/openapi.json",
        # Every check but positive_data_acceptance: a body the schema allows may still be refused
        # on meaning (an unknown model, a prompt longer than the context, a token id past the
        # vocabulary, a chat template that needs a message's content), and a 4xx is right then.
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
        "--generation-database", "none", "--continue-on-failure",
        "--workers", "1", "--request-timeout", "60", "--no-color",
    ]  # fmt: skip
    # cwd: a fresh directory, so no schemathesis.toml is picked up and nothing is left behind.
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    run = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=ST_TIMEOUT_S
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, f"schemathesis (seed {SEED}) found failures:\n{report[-12000:]}"
    assert "No issues found" in report, report[-4000:]
    assert fuzz_server.proc.poll() is None, fuzz_server.log()[-4000:]


def test_the_document_says_what_the_server_answers(http: httpx.Client) -> None:
    """What the fuzzer found the document missing: every error status an operation answers with,
    in the OpenAI envelope (and no FastAPI 422, never sent: validation errors are 400s); the
    streamed and Prometheus media types; the bodies; the value ranges the server checks."""
    spec = http.get("/openapi.json").json()
    envelope = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            for status, response in responses.items():
                if int(status) >= 400 and path != "/health":  # /health's 503 is its own body
                    assert response["content"] == envelope, (method, path, status)
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert schemas["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "415", "429", "500", "503"} <= set(chat)
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    fields = schemas["ChatCompletionRequest"]["properties"]
    assert (fields["n"]["maximum"], fields["temperature"]["maximum"]) == (MAX_N, 2)
    assert fields["functions"]["type"] == "null"  # refused with a 400 unless null
    assert schemas["TextContentPart"]["properties"]["type"]["enum"] == ["text", "input_text"]
