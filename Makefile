# Two set-up commands for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q

.PHONY: demo test lint bench clean

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) "torch>=2.4" setuptools wheel ninja
	$(PIP) --no-build-isolation -e ".[dev]"
	touch $@

# GIST on the embedded 8x8 digits with a small ViT: 8 epochs, about 10 s on two CPU cores (after the install)
demo: $(VENV)/.installed
	$(PY) -m gist_fast train --output runs/demo --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) -m gist_fast bench

clean:
	rm -rf $(VENV) build *.egg-info gist_fast/_C*.so
