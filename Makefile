# FemurSeg: `make demo` runs the main job on the bundled sample and model; `make test` runs every test.
# Both create (or reuse) the virtual environment .venv/ with the pinned dependencies first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.femurseg-installed

.PHONY: demo test benchmark finetune-benchmark venv clean

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/femurseg demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest Testing/Python -q -p no:cacheprovider

benchmark: $(STAMP)
	$(PY) benchmarks/inference_benchmark.py
	$(PY) benchmarks/throughput_benchmark.py

finetune-benchmark: $(STAMP)
	$(PY) benchmarks/finetune_benchmark.py

clean:
	rm -rf demo-output Testing/artifacts
