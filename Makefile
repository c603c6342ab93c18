# Two commands do all set-up on a fresh machine:
#   make demo   set up, then run the reference MNIST job (2 servers, 3 workers) locally
#   make test   set up, then run the whole test suite (make test-fast: the tests that start no process, < 2 min)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DATA := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Programs the tests drive: a real Prometheus server and headless Chromium (monitoring), redis-server (streams).
TEST_TOOLS := prometheus chromium redis-server

.PHONY: demo ctr online test test-fast setup data tools lint bench clean

# setup.py builds the C kernels (downpour/sparse/_native.c, downpour/server/_dense.c) into the package.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml setup.py downpour/sparse/_native.c downpour/server/_dense.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

data:
	@if [ ! -f $(DATA)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST not found: installing Debian's dataset-fashion-mnist"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

tools:
	@missing=""; for t in $(TEST_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (Debian packages) for the monitoring and stream tests"; \
		($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing) \
			|| echo "WARNING: could not install$$missing: the tests that need them will be SKIPPED"; \
	fi

demo: setup data
	$(VENV)/bin/downpour train examples/mnist.yaml

# The CTR workload: synthetic Criteo-format data (made once), then Wide & Deep on sparse tables.
CTR_DATA ?= data/criteo
CTR_ROWS ?= 3000000
ctr: setup
	@if [ ! -f $(CTR_DATA)/criteo.json ]; then $(VENV)/bin/downpour datagen criteo --rows $(CTR_ROWS) --out $(CTR_DATA) --overwrite; fi
	$(VENV)/bin/downpour train examples/ctr.yaml --set data.path=$(CTR_DATA)

# Online learning (docs/online.md): stream -> training -> export -> serving, for ONLINE_S seconds.
online: setup tools
	ONLINE_S=$${ONLINE_S:-60} examples/online-demo.sh

test: setup data tools
	$(PY) -m pytest -q

# The fast tier: every test that starts no process (tests marked `slow` start whole jobs; tests/conftest.py).
test-fast: setup data tools
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check downpour tests benchmarks

bench: setup data
	$(PY) benchmarks/transport.py
	$(PY) benchmarks/end_to_end.py
	$(PY) benchmarks/metrics_overhead.py
	$(PY) benchmarks/compression.py

clean:
	rm -rf $(VENV) runs data .pytest_cache
