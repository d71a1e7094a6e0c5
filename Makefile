# Two commands do all the set-up on a fresh machine with Python 3.10+:
#   make demo   -- install, then run the end-to-end demo on the bundled corpus
#   make test   -- install, then ruff + the test suite (without the `slow` marker)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0

.PHONY: install install-test test test-ray test-all lint demo bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

# The reference peers are test-only and installed with --no-deps: their own pins would pull
# numpy<2 (autofaiss), torchvision and a CUDA torch (timm). See docs/testing.md.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test,ray]'
	$(PIP) install -q --no-deps retro-pytorch==0.3.9 torchscale==0.3.0
	$(PIP) install -q --no-deps --no-build-isolation fairscale==0.4.0
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

lint: install-test
	$(VENV)/bin/ruff check retlm tests bench experiments

test: install-test lint
	$(VENV)/bin/pytest -m "not slow and not gpu" -q

# The Ray engine's tests alone (a local 2-CPU Ray cluster; about 75 s). `make test` runs them too.
test-ray: install-test
	$(VENV)/bin/pytest -m ray -q

test-all: install-test
	$(VENV)/bin/pytest -q

demo: install
	$(VENV)/bin/retlm demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
