# One-command entry points. `make run` and `make test` create .venv and install on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CUDA build of torch; on these machines pip takes it from local files. Override for other CUDA/CPU wheels.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install run test test-all test-slurm clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

run: install                ## the main job on the embedded default model (ARGS="method=obs_diff sparsity=0.6")
	$(BIN)/python run.py $(ARGS)

test: install               ## the default test suite (no slow/gpu/slurm markers)
	$(BIN)/python -m pytest -q $(ARGS)

test-all: install           ## include slow tests (retraining, full-size models, notebook)
	$(BIN)/python -m pytest -q -m "not gpu and not slurm" $(ARGS)

test-slurm: install         ## bring up a local SLURM cluster and run the sweep integration test
	bash slurm/local-cluster.sh up
	$(BIN)/python -m pytest -q -m slurm $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
