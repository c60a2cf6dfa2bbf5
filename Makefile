# Entry points: `make demo`, `make test` (the fast tier) and `make test-all` (every test). All set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint typecheck setup clean bench system-deps apt-install

# A bare Debian 12 has python3.11 but may lack its venv module (python3.11-venv): install it then.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || $(MAKE) --no-print-directory apt-install PKGS=python3.11
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  $(MAKE) --no-print-directory apt-install PKGS=python3.11-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m wbc_batch.demo

# Headless Chromium renders the HTML report in the tests; chromium-driver lets Selenium drive the review app
# (Debian packages, installed only when missing).
system-deps:
	@command -v chromium >/dev/null 2>&1 || $(MAKE) --no-print-directory apt-install PKGS=chromium
	@command -v chromedriver >/dev/null 2>&1 || $(MAKE) --no-print-directory apt-install PKGS=chromium-driver

apt-install:
	@SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(PKGS)

# Two tiers, one list: tests/conftest.py's SLOW marks the slow tests (multi-node, training and adapt end to end,
# soak and kill tests). `make test` leaves them out (about 4 minutes on 2 cores; still a local Ray, moto S3,
# Parquet read back and Chromium); `make test-all` runs every test, as .ci/run does.
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: $(STAMP) system-deps
	$(BIN)/python -m pytest -q tests

# ruff with the rules in pyproject.toml; .ci/run runs it before the tests.
lint: $(STAMP)
	$(BIN)/ruff check wbc_batch tests tools bench jobs

# mypy with the settings in pyproject.toml; clean, and .ci/run runs it after lint so it stays clean.
typecheck: $(STAMP)
	$(BIN)/mypy wbc_batch

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf demo-output .pytest_cache
