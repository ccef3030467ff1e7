# Herald: `make run` starts the platform on embedded defaults, `make test` checks it.
# All that is assumed on the machine is Python 3.11+ and make.

SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: run test lint typecheck unit migrate bench lock clean help test-tools wrk

help:
	@echo "make run      start the whole platform (embedded PostgreSQL, broker, SMTP sink, services)"
	@echo "make test     lint, type-check and run every test"
	@echo "make migrate  apply database migrations (DATABASE_URL, default: embedded server)"
	@echo "make bench    run the benchmarks under bench/"
	@echo "make lock     re-pin requirements.lock from pyproject.toml"

define debian_packages
test -x $(1) || { \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(2) from Debian's packages"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	else echo "$(1) is missing: install $(2) (Debian packages)" >&2; exit 1; fi; }
endef

$(STAMP):
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is required" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

run: $(STAMP)
	$(PY) -m herald.devinfra

migrate: $(STAMP)
	$(PY) -m herald.migrations

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy shared services tests bench

test: lint typecheck test-tools
	$(PY) -m pytest $(PYTEST_ARGS)

# The tracking tests open real mail pages in headless Chromium, the operator tests scrape the
# services with a real Prometheus, the quick start runs its curl and jq lines, the dispatcher's
# pipelining is checked against Postfix's smtp-sink (Debian's packages); the pixel benchmark loads the service with
# wrk. Installed when missing and we may (root with apt-get).
test-tools:
	@$(call debian_packages,/usr/bin/chromedriver,chromium chromium-driver)
	@$(call debian_packages,/usr/bin/prometheus,prometheus)
	@$(call debian_packages,/usr/bin/jq,jq)
	@$(call debian_packages,/usr/bin/curl,curl)
	@$(call debian_packages,/usr/sbin/smtp-sink,postfix)

wrk:
	@$(call debian_packages,/usr/bin/wrk,wrk)

bench: $(STAMP) wrk
	$(PY) -m bench

lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable --all | grep -vE '^(pip|setuptools|wheel)==' > requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
