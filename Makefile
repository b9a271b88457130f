# Setup is one idempotent target: a virtualenv in .venv with torch first, then
# deepspeed (it builds against the installed torch), then this package with what the demo needs.
# The test tools (moto's server, pytest, ruff, img2dataset) come on top for `make test` only: a large
# share of setup time that `make demo` does not need to spend.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-setup
TSTAMP  := $(VENV)/.stamp-test
# Fail before a long install that cannot fit (pip would stop minutes in with "No space left on device").
# Sizes of a fresh setup: .venv about 6.4 GiB (torch's CUDA wheels are most of it), img2dataset's venv 0.8 GiB.
NEED_GIB = $(PY) -c 'import shutil, sys; need, free = float(sys.argv[1]), shutil.disk_usage(".").free / 2**30; \
	sys.exit(0 if free >= need else "%s needs about %.1f GiB free on this disk; %.1f GiB free" % (sys.argv[2], need, free))'
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(BIN)/python -c 'import torch' 2>/dev/null || $(NEED_GIB) 6.6 "make setup (torch and its CUDA libraries)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt --no-build-isolation deepspeed
	# DeepSpeed compiles its CPU shared-memory allreduce op on first use (about a minute, once per venv
	# path); doing it here keeps that out of the first training run (or the first test). The compiler and
	# pip each keep one core busy, and pip only adds packages the build does not import, so they run side
	# by side. Either one failing fails the step.
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" & shm=$$!; \
	  $(BIN)/python -m pip install -q -c constraints.txt -e '.[demo]'; pip_rc=$$?; \
	  wait $$shm; shm_rc=$$?; test $$pip_rc -eq 0 && test $$shm_rc -eq 0
	touch $@

$(TSTAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# img2dataset in a venv of its own, as its users run it: it pins webdataset<0.3 and opencv<5, which
# would downgrade ours. Only the tests need it (they drive its real CLI), so `make demo` skips it.
I2D := $(VENV)/tools/img2dataset/bin/img2dataset
$(I2D): $(TSTAMP)
	$(NEED_GIB) 1.0 "img2dataset's venv (for the tests)"
	$(PY) -m venv $(VENV)/tools/img2dataset
	$(VENV)/tools/img2dataset/bin/python -m pip install -q img2dataset==1.47.0

demo: setup
	$(BIN)/swav demo

test: $(TSTAMP) $(I2D)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

# The unit tier: no training runs, no launchers (tests marked `slow` are left out).
test-fast: $(TSTAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --durations=10 tests

lint: $(TSTAMP)
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf demo-output runs .pytest_cache
