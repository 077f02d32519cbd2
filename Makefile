# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format test-py310 print-python310 bench bench-setup clean

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/crfasrnn demo -o demo-output

test: $(STAMP)
	$(PY) -m pytest -q

# The checks CI runs before the suite (also a pre-commit hook set: `.venv/bin/pre-commit install`).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The suite on the oldest Python the package supports, in its own environment (.venv310). PYTHON310 is any 3.10
# interpreter that runs: by default pyenv's, else the one on PATH. torch 2.13.0 for 3.10 comes from PyPI (a CUDA
# build, which runs on the CPU; about 5 GB installed, half a minute here).
PYTHON310 ?= $(shell for p in $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.10*/bin/python3.10 $$(command -v python3.10); do "$$p" -V >/dev/null 2>&1 && { echo "$$p"; break; }; done)
VENV310 ?= .venv310
STAMP310 := $(VENV310)/.installed

$(STAMP310): pyproject.toml requirements-dev.txt
	@test -n "$(PYTHON310)" || { echo "no Python 3.10 interpreter found: set PYTHON310=/path/to/python3.10"; exit 1; }
	$(PYTHON310) -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install --quiet --upgrade pip
	$(VENV310)/bin/python -m pip install --quiet -r requirements-dev.txt
	$(VENV310)/bin/python -m pip install --quiet -e .
	touch $(STAMP310)

print-python310:
	@echo $(PYTHON310)

# The learning studies (marker `study`, six minutes) run once, in `make test`: what they measure is torch's numerics,
# which the interpreter does not change.
test-py310: $(STAMP310)
	$(VENV310)/bin/python -m pytest -q -m "not slow and not study"

# The benchmark's peer (pydensecrf2) builds from source and needs Cython < 3.
bench-setup: $(STAMP)
	$(PY) -m pip install --quiet "Cython<3" setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation pydensecrf2

bench: bench-setup
	$(PY) bench/crf_speed.py
	$(PY) bench/densecrf_speed.py
	$(PY) bench/loss_speed.py
	$(PY) bench/higher_order_speed.py

clean:
	rm -rf $(VENV) $(VENV310) demo-output .pytest_cache .mypy_cache .ruff_cache
