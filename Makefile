# Setup is one idempotent target: a virtualenv in .venv with torch first, then
# deepspeed (it builds against the installed torch), then this package.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-setup
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt --no-build-isolation deepspeed
	# DeepSpeed compiles its CPU shared-memory allreduce op on first use (about a minute on 2 cores, once
	# per venv path); doing it here keeps that out of the first training run (or the first test).
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# img2dataset in a venv of its own, as its users run it: it pins webdataset<0.3 and opencv<5, which
# would downgrade ours. Only the tests need it (they drive its real CLI), so `make demo` skips it.
I2D := $(VENV)/tools/img2dataset/bin/img2dataset
$(I2D): $(STAMP)
	$(PY) -m venv $(VENV)/tools/img2dataset
	$(VENV)/tools/img2dataset/bin/python -m pip install -q img2dataset==1.47.0

demo: setup
	$(BIN)/swav demo

test: setup $(I2D)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf demo-output runs .pytest_cache
