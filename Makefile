# Quick start: `make repro` (run the DVC pipeline) and `make test` (lint and format check, the test suite,
# and the docs build).
# Both create .venv if needed and install torch first, so a CPU-only machine gets the
# CPU wheel (TORCH_SPEC) and never the CUDA wheels a bare `pip install torch` would pull.
VENV       ?= .venv
PYTHON     ?= python3
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.segpipe-installed
SITE_DIR   ?= site

.PHONY: install repro test docs bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e '.[test,bench]'
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)
	$(VENV)/bin/mkdocs build --strict --site-dir $(SITE_DIR)

# The documentation (docs/, listed in mkdocs.yml) as a site in $(SITE_DIR)/; --strict: a broken link,
# a missing heading or a page left out of the nav is an error. `make test` builds it too.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir $(SITE_DIR)

clean-venv:
	rm -rf $(VENV)
