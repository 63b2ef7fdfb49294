# Set-up and everyday commands. Everything lives in a local virtualenv ($(VENV)).
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned so pip takes the CPU build (an unpinned torch pulls a multi-GB CUDA build).
TORCH ?= torch==2.13.0
MODEL ?= smollm2-135m-instruct
ARGS ?=

.PHONY: install install-dev serve test test-fast lint

# The convert extra (transformers) turns the catalogue's GGUF files into Hugging Face
# directories on first use; the server itself never imports it.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[convert]'
	touch $@

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

serve: install
	$(PY) -m server --model $(MODEL) $(ARGS)

test: install-dev
	$(PY) -m pytest -q $(ARGS)

# The pure-Python core and the server's protocol layer: no model, no server, no kernel build.
test-fast: install-dev
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: install-dev
	$(PY) -m ruff check engine server tests benchmarks
