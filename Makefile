# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-setup clean

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

# The benchmark's peer (pydensecrf2) builds from source and needs Cython < 3.
bench-setup: $(STAMP)
	$(PY) -m pip install --quiet "Cython<3" setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation pydensecrf2

bench: bench-setup
	$(PY) bench/crf_speed.py
	$(PY) bench/densecrf_speed.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
