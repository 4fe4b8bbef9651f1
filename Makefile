# Every target sets up .venv itself: `make test` works from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch 2.13.0 (a CPU build on a machine without CUDA); set TORCH_SPEC= to keep the torch you have.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-gpu native clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(if $(TORCH_SPEC),$(PIP) install "$(TORCH_SPEC)")
	$(PIP) install --no-build-isolation -e ".[test,bench]"
	touch $@

demo: $(STAMP)
	$(PY) -m alignfast.cli demo

# The public API's contract lives beside the repo (../shared/contract) where the project has one.
CONTRACT := $(wildcard ../shared/contract)

test: $(STAMP)
	$(PY) -m pytest tests $(CONTRACT) -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m benchmarks.run --suite cpu

bench-gpu: $(STAMP)
	$(PY) -m benchmarks.run --suite gpu

native: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

clean:
	rm -rf build *.egg-info alignfast/_C*.so
