# Two set-up commands for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q

.PHONY: demo test bench clean

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) "torch>=2.4" setuptools wheel ninja
	$(PIP) --no-build-isolation -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m gist_fast demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m gist_fast bench

clean:
	rm -rf $(VENV) build *.egg-info gist_fast/_C*.so
