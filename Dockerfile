# Kestrel: an OpenAI-compatible inference server. The image serves the default model offline:
#   docker build -t kestrel . && docker run -p 8000:8000 kestrel
# Configure with KESTREL_* environment variables (see config/default.toml), e.g. -e KESTREL_API_KEY=...

# ---- builder: the virtualenv, installed as the Makefile does, and the converted default model ----
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 KESTREL_HOME=/opt/kestrel
WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine engine
COPY server server
COPY config config
# torch is pinned as in the Makefile. On a machine whose pip finds the CPU wheel (as ours does)
# that is what gets installed; elsewhere point pip at an index with the CPU build (an
# `ENV PIP_EXTRA_INDEX_URL=...` line here), or the default CUDA build makes the image GBs larger.
ARG TORCH=torch==2.13.0
ARG MODEL=smollm2-135m-instruct
RUN python -m venv /app/.venv \
 && /app/.venv/bin/pip install -q "$TORCH" \
 && /app/.venv/bin/pip install -q -e .
# The GGUF -> safetensors conversion needs transformers + gguf once; they stay out of the image.
RUN python -m venv /tmp/convert \
 && /tmp/convert/bin/pip install -q "$TORCH" \
 && /tmp/convert/bin/pip install -q -e '.[convert]' \
 && /tmp/convert/bin/python -m engine.assets fetch "$MODEL"

# ---- runtime: the venv, the code and the model, run as an unprivileged user ----
FROM python:3.11-slim
# g++ compiles the fused CPU kernels for the CPU the container runs on, once, at server start
# (cached under $KESTREL_HOME/kernels); without it the server falls back to slower eager ops.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 kestrel
ENV KESTREL_HOME=/opt/kestrel KESTREL_HOST=0.0.0.0 KESTREL_PORT=8000 PATH=/app/.venv/bin:$PATH
WORKDIR /app
COPY --from=builder /app /app
COPY --from=builder --chown=kestrel:kestrel /opt/kestrel /opt/kestrel
USER kestrel
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('KESTREL_PORT', '8000')}/health\", timeout=4)"]
ENTRYPOINT ["python", "-m", "server"]
