# `make test` and `make demo` each set everything up on a fresh machine: a .venv, torch==2.13.0
# (CPU wheel; installed first so nothing pulls a CUDA build), then the project with its extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reconad-installed
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: install test test-slow test-gpu demo lint-imports clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,export,runtime,lite,line,bench,dev,serve]'
	$(PY) -m pip install --quiet -e '.[gst]' || echo "PyGObject did not build (needs libgirepository1.0-dev libcairo2-dev, see .ci/services.sh): the RTSP and display output tests will skip."
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

# Needs TensorRT and a CUDA GPU (tests skip with a reason otherwise).
test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) PY=$(PY) bash scripts/demo.sh

lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
