# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench env clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,onnx]"
	touch $(STAMP)

env: $(STAMP)

# Train on synthetic payments, serve (outlierd serve on 127.0.0.1), stream with injected anomalies,
# retrain and hot-swap mid-stream, summarise, stop with SIGTERM: bounded, about 30 s.
demo: $(STAMP)
	$(BIN)/outlierd demo --registry runs/demo-registry

# pytest exits 5 when it collected no test: that is a failure here, said plainly.
test: $(STAMP)
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# Speed suites (outside the test run); OUTLIERD_BENCH_ROWS shrinks the data.
bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only -p no:cacheprovider --benchmark-columns=median,min,max,rounds,iterations

clean:
	rm -rf $(VENV) runs .benchmarks
