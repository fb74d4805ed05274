# Two user-facing targets: `make demo` (the main job) and `make test`.
PYTHON ?= python3
# Where torch comes from. Empty: the default index (PyPI), which serves the CUDA build on Linux.
# CPU-only hosts: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo browser

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "brainrank needs Python >= 3.11, but PYTHON=$(PYTHON) is \
	$$($(PYTHON) --version 2>&1 || echo missing); run make again with PYTHON=python3.11 (or newer)" >&2; \
		exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
		"torch==2.13.0"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# tests/test_qc_page.py opens the report's QC page in a headless Chromium. Idempotent: does
# nothing when a Chromium is on PATH; else installs Debian/Ubuntu's package (as root, or
# through passwordless sudo) or stops with one line saying what to install.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	command -v google-chrome >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else echo "tests need Chromium: install it (Debian/Ubuntu: apt-get install chromium) \
	and run make again" >&2; exit 2; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			chromium; }

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

# The whole pipeline on a simulated cohort (deployments/configs/demo.yaml): <= 10 minutes on
# 2 CPU cores; prints the report path and the test MAE / SRCC. A second run takes seconds.
demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/brainrank pipeline \
		--config deployments/configs/demo.yaml --out runs/demo
