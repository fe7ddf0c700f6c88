# trimode: `make install` sets everything up, `make test` runs the tests (see README.md).
PYTHON ?= python3
# The CPU wheel of torch (a local file on the project's CPU machines); on a GPU machine set TORCH=torch.
TORCH ?= torch==2.13.0

.PHONY: install plugins test test-integration lint device-check clean

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

lint:
	$(PYTHON) -m ruff check .

clean:
	rm -rf build dist *.egg-info .pytest_cache
	@if [ -f plugins/Makefile ]; then $(MAKE) -C plugins clean; fi
