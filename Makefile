# Two commands do all set-up on a fresh machine: `make serve` runs the server, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: setup sysdeps serve serve-metrics test clean
setup: $(STAMP)

# Debian's prometheus server, which the metrics test scrapes the running app with, and Debian's chromium with its
# chromedriver, which the playground test drives headless (no browser download at run time); each installed only
# when missing.
SYSDEPS := prometheus:prometheus chromium:chromium chromedriver:chromium-driver
sysdeps:
	@missing=$$(for d in $(SYSDEPS); do command -v $${d%%:*} >/dev/null 2>&1 || echo $${d#*:}; done); \
	[ -z "$$missing" ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; }

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[serve,test]'
	rm -f $(VENV)/.installed-*; touch $@

serve: setup
	$(VENV)/bin/serve run serve_config.yaml

# The same, with Ray's metrics (ray_dit_* and ray_serve_*) on the fixed port 8080 for Prometheus; `ray stop` ends it.
serve-metrics: setup
	$(VENV)/bin/ray start --head --metrics-export-port=8080 --disable-usage-stats
	$(VENV)/bin/serve run serve_config.yaml

# PYTHONFAULTHANDLER: a crash in native code (Ray's core worker, torch) during the tests prints every thread's Python
# stack instead of only "Segmentation fault". The process then ends without the interpreter's teardown
# (tests/conftest.py, pytest_unconfigure), where such a crash had no Python frame to print.
test: setup sysdeps
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
