# Kestrel: an OpenAI-compatible inference server. The image serves the default model offline, with
# the fused CPU kernels prebuilt for each x86-64 level (the server picks one from the CPU's flags):
#   docker build -t kestrel . && docker run -p 8000:8000 kestrel
# Configure with KESTREL_* environment variables (see config/default.toml), e.g. -e KESTREL_API_KEY=...
# Build arguments (README, "Docker"): BASE_IMAGE, TORCH, TORCH_INDEX_URL, MODEL, and pip's own
# settings for the build's pip: PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS,
# PIP_TRUSTED_HOST, PIP_CERT. Only the stages that run pip see them; the image does not keep them.

# Debian bookworm with its python3 (3.11) and venv, or an image like it (README: a local one).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- venv: the CPU build of torch and Kestrel's dependencies, the one virtualenv the image keeps ----
FROM ${BASE_IMAGE} AS venv
ARG TORCH=torch==2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /app
# PyPI's torch is the CUDA build (GBs more): take the CPU wheel from the PyTorch CPU index, or, with
# TORCH_INDEX_URL empty, from wherever pip's settings above find one.
RUN python3 -m venv /app/.venv \
 && if [ -n "$TORCH_INDEX_URL" ]; then \
      /app/.venv/bin/pip install -q --index-url "$TORCH_INDEX_URL" "$TORCH"; \
    else \
      /app/.venv/bin/pip install -q "$TORCH"; \
    fi
# The dependencies alone (pyproject.toml's), so that code changes rebuild none of this.
COPY pyproject.toml ./
RUN /app/.venv/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /app/.venv/bin/pip install -q -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# ---- kernels: the C++ kernels compiled for every instruction-set level; g++ stays in this stage ----
FROM venv AS kernels
RUN command -v g++ >/dev/null \
 || (apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*)
COPY engine/__init__.py engine/
COPY engine/kernels engine/kernels
RUN /app/.venv/bin/python -m engine.kernels build

# ---- model: the default model fetched and converted; transformers stays in this stage ----
FROM venv AS model
ARG MODEL=smollm2-135m-instruct
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ENV KESTREL_HOME=/opt/kestrel
RUN /app/.venv/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['convert']))" > /tmp/requirements.txt \
 && /app/.venv/bin/pip install -q -r /tmp/requirements.txt
COPY engine engine
# A catalogue name becomes a Hugging Face directory (the GGUF it came from is dropped); a
# `<name>-<quantization>` name stays the GGUF file it is.
RUN /app/.venv/bin/python -c "import sys; from engine.assets import resolve_model; print(resolve_model(sys.argv[1]))" "$MODEL" > /tmp/model \
 && case "$(cat /tmp/model)" in *.gguf) ;; *) rm -rf "$KESTREL_HOME/gguf" ;; esac

# ---- app: the code, installed (editable) into the venv, beside the prebuilt kernels ----
FROM kernels AS app
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
COPY README.md ./
COPY engine engine
COPY server server
COPY config config
# The image compiles no C++ (the kernels are prebuilt) and runs no C++ tests: torch's headers, its
# test programs and its libraries' symbol tables (for debuggers; .dynsym stays) go, 240 MB.
RUN /app/.venv/bin/pip install -q --no-deps -e . \
 && torch=$(/app/.venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")/torch \
 && rm -rf "$torch/include" "$torch/test" "$torch/bin/test_"* "$torch/bin/"*Test \
 && strip --strip-unneeded "$torch"/lib/*.so*

# ---- runtime: the venv, the code, the kernels and the model, run as an unprivileged user ----
FROM ${BASE_IMAGE}
ARG MODEL=smollm2-135m-instruct
RUN useradd --create-home --uid 10001 kestrel
ENV KESTREL_HOME=/opt/kestrel KESTREL_HOST=0.0.0.0 KESTREL_PORT=8000 KESTREL_MODEL=${MODEL} \
    PATH=/app/.venv/bin:$PATH
WORKDIR /app
COPY --from=app /app /app
COPY --from=model --chown=kestrel:kestrel /opt/kestrel /opt/kestrel
USER kestrel
EXPOSE 8000
# The first start (torch import, model load, no compile) takes 5-15 s; the start period allows more.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('KESTREL_PORT', '8000')}/health\", timeout=4)"]
ENTRYPOINT ["python", "-m", "server"]
