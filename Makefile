# Set-up and everyday tasks. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0: on this project's machines pip takes the CPU build from a local wheel. Elsewhere pick your
# build, e.g. `make setup TORCH=torch` for the default (CUDA) one, or install torch first.
TORCH  ?= torch==2.13.0
EXTRAS ?= train,export,cpu,dev

.PHONY: setup demo test test-all lint clean default-model bench bench-d16 bench-memory bench-early-centric \
        bench-runtime bench-int8 bench-data

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# The main job: the torch-free runtime (ecm-run, ONNX Runtime on the CPU) generates four images for each
# bundled Canny condition with the embedded default model (exported to ONNX once, into ~/.cache/ecm).
SAMPLES := $(sort $(wildcard ecm/assets/samples/*.png))
demo: setup
	$(BIN)/ecm-run $(foreach f,$(SAMPLES),--cond $(f) --class $(firstword $(subst _, ,$(notdir $(f))))) \
	    -n 4 --out demo.png
	@echo "demo picture: $(CURDIR)/demo.png  (each row: the condition, then four samples)"

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

# Reproduce the embedded default model (about an hour on two CPU cores), then pack it as fp16.
default-model: setup
	$(BIN)/ecm-pretrain --out runs/default/backbone
	$(BIN)/ecm-train --control canny --vae runs/default/backbone/vqvae.safetensors \
	    --var runs/default/backbone/var.safetensors --steps 6000 --out runs/default/ecm-canny
	$(BIN)/ecm-pack-default --backbone runs/default/backbone --ecm runs/default/ecm-canny/ecm.safetensors

# Every speed and size figure side by side (about ten minutes on two CPU cores): ecm-bench.png, ecm-bench.json.
bench: setup
	$(BIN)/ecm-bench --json ecm-bench.json

# The official d16 size (random weights, written as checkpoints, exported by ecm-export with its defaults):
# about 40 minutes here; ecm-bench-d16.png, ecm-bench-d16.json.
bench-d16: setup
	$(BIN)/ecm-bench --models d16 --repeats 3 --json ecm-bench-d16.json --png ecm-bench-d16.png

# Device memory of d16..d30 + ECM at fp16 and INT8, and the Jetson modules they fit (the README's table).
bench-memory: setup
	$(BIN)/python benchmarks/memory_plan.py

# The training data pipeline at scale: ecm-prepare and streamed ecm-train on 2 000 and 50 000 procedural images,
# the loader against the training step, d16 at 256 px on real photos (about 25 minutes): data-pipeline.json.
bench-data: setup
	$(BIN)/python benchmarks/data_pipeline.py --json data-pipeline.json

bench-early-centric: setup
	$(BIN)/python benchmarks/early_centric.py

bench-runtime: setup
	$(BIN)/python benchmarks/runtime.py

bench-int8: setup
	$(BIN)/python benchmarks/int8.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
