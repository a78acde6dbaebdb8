# progan-service: `make demo` sets up a fresh machine and trains the quickstart; `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: venv system-deps demo test bench

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $@

# Debian packages the tests use: a real Prometheus server and Fashion-MNIST.
system-deps:
	@if ! command -v prometheus >/dev/null || [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus dataset-fashion-mnist >/dev/null; \
	fi

demo: venv
	$(VENV)/bin/progan prepare builtin data/quickstart --resolution 32 --limit 4000 --overwrite
	$(VENV)/bin/progan train configs/quickstart.yaml

test: venv system-deps
	$(PY) -m pytest -ra
