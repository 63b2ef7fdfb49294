#!/usr/bin/env bash
# Build the Docker image, run it, and check it end to end: seconds from `docker run` to a green
# /health, a chat request, a streamed chat request, a greedy completion, the fused kernels it loaded, Docker's own
# health status, and KESTREL_API_KEY (401 without the key, 200 with it) on a second container
# whose $KESTREL_HOME is a volume. Not part of `make test`: the build alone takes minutes.
#
#   scripts/docker_smoke.sh
#
# Environment:
#   IMAGE              tag to build and run (kestrel:smoke)
#   SKIP_BUILD=1       run IMAGE as it is
#   DOCKER_BUILD_ARGS  more `docker build` arguments, e.g. "--build-arg BASE_IMAGE=kestrel-base:bookworm"
#   WHEELS_DIR         a local directory of wheels (a CPU torch wheel, say) for the build's pip: served
#                      on 127.0.0.1 for a build on the host network, with TORCH_INDEX_URL empty
#   HEALTH_TIMEOUT     seconds to wait for /health (120)
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-kestrel:smoke}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-120}
MODEL=smollm2-135m-instruct
RUN_ID="kestrel-smoke-$$"
VOLUME="$RUN_ID-home"
failures=0
server_pid=""

cleanup() {
  docker rm -f "$RUN_ID-1" "$RUN_ID-2" >/dev/null 2>&1 || true
  docker volume rm "$VOLUME" >/dev/null 2>&1 || true
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

pass() { printf 'PASS  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ---- build ----
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  build_args=()
  if [ -n "${DOCKER_BUILD_ARGS:-}" ]; then read -r -a build_args <<<"$DOCKER_BUILD_ARGS"; fi
  if [ -n "${WHEELS_DIR:-}" ]; then
    wheels_port=$(free_port)
    python3 -m http.server -d "$WHEELS_DIR" -b 127.0.0.1 "$wheels_port" >/dev/null 2>&1 &
    server_pid=$!
    build_args+=(--network host --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$wheels_port/" --build-arg TORCH_INDEX_URL=)
  fi
  echo "building $IMAGE: docker build ${build_args[*]} -t $IMAGE ."
  started=$(date +%s)
  if ! docker build "${build_args[@]}" -t "$IMAGE" . >"/tmp/$RUN_ID-build.log" 2>&1; then
    tail -30 "/tmp/$RUN_ID-build.log"
    echo "FAIL  docker build (log: /tmp/$RUN_ID-build.log)"
    exit 1
  fi
  pass "docker build in $(($(date +%s) - started)) s (log: /tmp/$RUN_ID-build.log)"
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; server_pid=""; fi
fi
size=$(docker image ls "$IMAGE" --format '{{.Size}}')
echo "image $IMAGE: $size"

# ---- run: seconds to /health ----
# Prints the seconds from `docker run` until /health answered 200, or fails.
start_container() {
  local name=$1 port=$2
  shift 2
  local started
  started=$(date +%s.%N)
  docker run -d --name "$name" -p "127.0.0.1:$port:8000" "$@" "$IMAGE" >/dev/null
  local deadline=$(($(date +%s) + HEALTH_TIMEOUT))
  until curl -sf -o /dev/null "http://127.0.0.1:$port/health"; do
    if [ "$(date +%s)" -ge "$deadline" ] || [ "$(docker inspect -f '{{.State.Running}}' "$name")" != true ]; then
      docker logs "$name" 2>&1 | tail -20 >&2
      return 1
    fi
    sleep 0.2
  done
  python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$started"
}

port=$(free_port)
if seconds=$(start_container "$RUN_ID-1" "$port"); then
  pass "/health green ${seconds} s after docker run"
else
  fail "/health not green within $HEALTH_TIMEOUT s"
  exit 1
fi
url="http://127.0.0.1:$port"

# ---- chat ----
chat_body='{"model": "'$MODEL'", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24, "temperature": 0}'
reply=$(curl -s -w '\n%{http_code}' "$url/v1/chat/completions" -H 'Content-Type: application/json' -d "$chat_body")
status=${reply##*$'\n'}
content=$(printf '%s' "${reply%$'\n'*}" | python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])' 2>/dev/null || true)
if [ "$status" = 200 ] && [ -n "$content" ]; then
  pass "chat: 200, \"$(printf '%s' "$content" | tr '\n' ' ' | cut -c1-80)\""
else
  fail "chat: status $status, body ${reply%$'\n'*}"
fi

# ---- streamed chat ----
stream_body='{"model": "'$MODEL'", "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 24, "temperature": 0, "stream": true}'
stream=$(curl -sN "$url/v1/chat/completions" -H 'Content-Type: application/json' -d "$stream_body")
streamed=$(printf '%s\n' "$stream" | python3 -c '
import json, sys
events = [line[6:] for line in sys.stdin.read().splitlines() if line.startswith("data: ")]
assert events and events[-1] == "[DONE]", "no [DONE]"
chunks = [json.loads(event) for event in events[:-1]]
print("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]), f"({len(chunks)} chunks)")
' 2>&1) && pass "streamed chat: \"$(printf '%s' "$streamed" | tr '\n' ' ' | cut -c1-90)\"" || fail "streamed chat: $streamed"

# ---- greedy completion: the kernels compute what they compute outside the image ----
completion=$(curl -s "$url/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "'$MODEL'", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}' \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["text"])' 2>/dev/null || true)
case "$completion" in
  " Paris"*) pass "completion: \"The capital of France is$(printf '%s' "$completion" | tr '\n' ' ')\"" ;;
  *) fail "completion: \"$completion\" (greedy SmolLM2 says \" Paris.\")" ;;
esac

# ---- kernels and Docker's health status ----
logs=$(docker logs "$RUN_ID-1" 2>&1)
if printf '%s' "$logs" | grep -q "fused CPU kernels: prebuilt"; then
  pass "kernels: $(printf '%s' "$logs" | grep -o 'prebuilt kestrel_cpu_ops-[a-z0-9-]*' | head -1)"
else
  fail "kernels: no prebuilt library loaded: $(printf '%s' "$logs" | grep -i kernels | head -3)"
fi
deadline=$(($(date +%s) + 60))
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$RUN_ID-1")" = healthy ] || [ "$(date +%s)" -ge "$deadline" ]; do sleep 1; done
health=$(docker inspect -f '{{.State.Health.Status}}' "$RUN_ID-1")
[ "$health" = healthy ] && pass "docker health status: healthy" || fail "docker health status: $health"
docker rm -f "$RUN_ID-1" >/dev/null

# ---- KESTREL_API_KEY, with $KESTREL_HOME on a volume ----
port=$(free_port)
if seconds=$(start_container "$RUN_ID-2" "$port" -e KESTREL_API_KEY=smoke-secret -v "$VOLUME:/opt/kestrel"); then
  pass "/health green ${seconds} s after docker run (API key, volume at /opt/kestrel)"
  url="http://127.0.0.1:$port"
  without=$(curl -s -o /dev/null -w '%{http_code}' "$url/v1/chat/completions" -H 'Content-Type: application/json' -d "$chat_body")
  with=$(curl -s -o /dev/null -w '%{http_code}' "$url/v1/chat/completions" -H 'Content-Type: application/json' -H 'Authorization: Bearer smoke-secret' -d "$chat_body")
  [ "$without" = 401 ] && pass "API key: 401 without it" || fail "API key: $without without it"
  [ "$with" = 200 ] && pass "API key: 200 with it" || fail "API key: $with with it"
  docker logs "$RUN_ID-2" 2>&1 | grep -q "fused CPU kernels: prebuilt" \
    && pass "kernels: prebuilt with a volume at \$KESTREL_HOME" || fail "kernels: not prebuilt with a volume at \$KESTREL_HOME"
else
  fail "/health not green within $HEALTH_TIMEOUT s (API key, volume at /opt/kestrel)"
fi

if [ "$failures" -eq 0 ]; then echo "all checks passed ($IMAGE, $size)"; else echo "$failures check(s) failed"; fi
exit $((failures > 0))
