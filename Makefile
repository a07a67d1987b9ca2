# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The demo needs none of the extras (torch alone is hundreds of MB): its own, smallest environment.
DEMO_VENV  := .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.installed

.PHONY: demo test lint bench env clean deps-system

# torch==2.13.0 (the torch extra, for the torch backend's tests): where pip finds it only on PyPI,
# that is a CUDA build of several GB on Linux x86_64; a CPU-only wheel comes from pip's own
# configuration (PIP_INDEX_URL / PIP_FIND_LINKS), as on the project's CI machines.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,onnx,torch,mlflow,dask,bench,postgres,kafka,mqtt]"
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q --upgrade pip
	$(DEMO_VENV)/bin/pip install -q -e .
	touch $(DEMO_STAMP)

# KServe's own clients for the Open Inference Protocol test (tests/test_oip.py): kserve pins protobuf 6,
# so it gets a virtualenv of its own, found by the test through OUTLIERD_KSERVE_PYTHON. An install
# that fails leaves no stamp: that test then skips, saying so.
KSERVE_VENV  := .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed
$(KSERVE_STAMP): Makefile
	@$(PYTHON) -m venv $(KSERVE_VENV) && $(KSERVE_VENV)/bin/pip install -q "kserve>=0.13" && touch $(KSERVE_STAMP) \
		|| echo "make: kserve could not be installed in $(KSERVE_VENV): the KServe client test will skip" >&2

env: $(STAMP)

# Train on raw payment events through the shipped feature spec, serve (outlierd serve on 127.0.0.1),
# stream fresh events with injected frauds, print recall per fraud kind, stop with SIGTERM: bounded,
# about 30 s (the vector demo with a mid-stream hot swap: outlierd demo --vectors).
demo: $(DEMO_STAMP)
	$(DEMO_VENV)/bin/outlierd demo --registry runs/demo-registry

# promtool + prometheus for the deploy/ monitoring tests (Debian's prometheus package): installed
# when missing, as root with apt-get; otherwise a note, and those tests skip saying why.
deps-system:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make deps-system: installing prometheus (promtool) with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else echo "make deps-system: no promtool/prometheus and no root apt-get to install them: the deploy/prometheus tests will skip" >&2; fi

# mypy checks these packages and modules by import name (outlierd.core is core/), each with -p, plus
# the top-level outlierd/__init__.py (-m outlierd: `-p outlierd` would take in every subpackage).
MYPY_PATHS := outlierd.core outlierd.server outlierd.training outlierd.monitoring \
	outlierd.cli outlierd.feedback_cli outlierd.health_cli outlierd.registry_cli outlierd.rollout_cli outlierd.demo \
	outlierd.prefect_flow \
	outlierd.bench \
	outlierd.features_cli outlierd.payments outlierd.demo_events \
	outlierd.consume_cli

# The installed layout (.ci/installed_layout.py) lets mypy and import-linter see core/ as outlierd.core.
LAYOUT := $(BIN)/python .ci/installed_layout.py

# pytest exits 5 when it collected no test: that is a failure here, said plainly. Then lint, the
# import contracts and types; each stops the target with a line saying which check failed.
test: $(STAMP) $(KSERVE_STAMP) deps-system
	@if [ -f $(KSERVE_STAMP) ]; then export OUTLIERD_KSERVE_PYTHON=$(CURDIR)/$(KSERVE_VENV)/bin/python; fi; \
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc
	@$(MAKE) --no-print-directory lint

# Static checks alone (no pytest): ruff, import-linter's contracts (pyproject.toml), mypy. All three
# run; the target fails naming each check that failed.
lint: $(STAMP)
	@failed=""; \
	echo "== ruff check ."; $(BIN)/ruff check . || failed="$$failed ruff"; \
	echo "== lint-imports (pyproject.toml [tool.importlinter])"; \
	$(LAYOUT) lint-imports --no-logo --no-cache $(CURDIR)/pyproject.toml || failed="$$failed import-contracts"; \
	echo "== mypy -m outlierd $(addprefix -p ,$(MYPY_PATHS))"; \
	$(LAYOUT) mypy --config-file $(CURDIR)/pyproject.toml --cache-dir $(CURDIR)/.mypy_cache \
		-m outlierd $(addprefix -p ,$(MYPY_PATHS)) || failed="$$failed mypy"; \
	if [ -n "$$failed" ]; then echo "make test: static checks failed:$$failed (see above)" >&2; exit 1; fi

# Speed suites (outside the test run); OUTLIERD_BENCH_ROWS shrinks the data.
bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only -p no:cacheprovider --benchmark-columns=median,min,max,rounds,iterations

clean:
	rm -rf $(VENV) $(DEMO_VENV) $(KSERVE_VENV) runs .benchmarks build/installed-layout .mypy_cache .ruff_cache
