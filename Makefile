# Two commands (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# The default data set: the copy beside a checkout (CI, developers) if present; otherwise
# incubation looks in the user cache, Debian's dataset-fashion-mnist, then downloads it.
SHARED_DATA := $(wildcard $(CURDIR)/../shared/data/fashion-mnist)
ifneq ($(SHARED_DATA),)
export INCUBATION_DATA_DIR ?= $(SHARED_DATA)
endif
# nvcc on PATH may be a wrapper outside the toolkit; point torch at the toolkit itself.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
# CI builds the CUDA kernels for one arch (Hopper) to save time; a failed compile fails it, and
# so does a test Slurm cluster (scripts/slurm-up.sh) that does not start.
ifeq ($(CI),true)
export TORCH_CUDA_ARCH_LIST ?= 9.0
export INCUBATION_REQUIRE_EXTENSION ?= 1
export INCUBATION_REQUIRE_SLURM ?= 1
endif
# Compile jobs for the extension: one more than the cores, so that the last of its 5 objects
# (3 without CUDA) does not compile alone while a core waits (with 2 jobs, the last one alone took
# a third of the build).
export MAX_JOBS ?= $(shell echo $$(( $$(nproc) + 1 )))
# pytest processes for `make test` (pytest-xdist): one per core (TEST_JOBS=0: one process). worksteal
# hands each worker a contiguous part of the tests, so that a file's module fixtures (compile_check's
# offline compile, test_cli's meta run) are computed once; an idle worker takes over the rest of
# another's. (loadgroup's xdist_group does nothing under pytest 9.2 with xdist 3.8.0: tried.)
TEST_JOBS ?= auto

EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/include/*.h)

.PHONY: demo test install clean

demo: $(STAMP)
	$(PY) -m incubation.cli run --preset demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m compileall -q incubation   # once, for every process the tests start (PYTHONDONTWRITEBYTECODE may be set)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal

install: $(STAMP)

# Re-runs only when the pins, the build files or the C++/CUDA sources change.
$(STAMP): requirements.txt setup.py pyproject.toml $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	$(PY) -c "import incubation; print(incubation.ops.format_backends('cpu'))"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info incubation/*.so
