# Set-up and everyday tasks. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0: on this project's machines pip takes the CPU build from a local wheel. Elsewhere pick your
# build, e.g. `make setup TORCH=torch` for the default (CUDA) one, or install torch first.
TORCH  ?= torch==2.13.0
EXTRAS ?= train,export,cpu,dev,demo,browser

.PHONY: setup demo demo-page test test-all browser lint clean default-model bench bench-d16 bench-memory bench-early-centric \
        bench-runtime bench-int8 bench-data bench-compose bench-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# The main job: the torch-free runtime (ecm-run, ONNX Runtime on the CPU) generates four images for each
# bundled Canny condition with the embedded default model (exported to ONNX once, into ~/.cache/ecm); then
# one row that combines Canny and lowres conditions, and one that inpaints a photo (class 5: diamonds).
SAMPLES := $(sort $(wildcard ecm/assets/samples/*.png))
EDIT    := ecm/assets/samples/edit
demo: setup
	$(BIN)/ecm-run $(foreach f,$(SAMPLES),--cond $(f) --class $(firstword $(subst _, ,$(notdir $(f))))) \
	    -n 4 --out demo.png
	$(BIN)/ecm-run --cond canny=$(EDIT)/edges.png --cond lowres=$(EDIT)/small.png --control-weight canny=1,lowres=1 \
	    --class 5 -n 4 --out demo_combined.png
	$(BIN)/ecm-run --init $(EDIT)/photo.png --mask $(EDIT)/mask.png --cond canny=$(EDIT)/edges.png \
	    --class 5 -n 4 --out demo_inpaint.png
	@echo "demo pictures: $(CURDIR)/demo.png  (each row: the condition, then four samples)"
	@echo "               $(CURDIR)/demo_combined.png  (Canny and lowres conditions, then four samples)"
	@echo "               $(CURDIR)/demo_inpaint.png  (the condition, the photo with the region to generate greyed, four samples)"

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# Everything, the slow tests too: ecm-demo's page in a headless chromium (Debian's, installed here if missing).
test-all: setup browser
	$(BIN)/python -m pytest -q -m "slow or not slow"

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

# The web page over the runtime (ecm-demo) on the embedded default: http://127.0.0.1:7860
demo-page: setup
	$(BIN)/ecm-demo

# Reproduce the embedded default model (about 1.5 hours on two CPU cores), then pack it as fp16.
default-model: setup
	$(BIN)/ecm-pretrain --out runs/default/backbone
	$(BIN)/ecm-train --control canny --vae runs/default/backbone/vqvae.safetensors \
	    --var runs/default/backbone/var.safetensors --steps 6000 --out runs/default/ecm-canny
	$(BIN)/ecm-train --control lowres --vae runs/default/backbone/vqvae.safetensors \
	    --var runs/default/backbone/var.safetensors --steps 6000 --out runs/default/ecm-lowres
	$(BIN)/ecm-pack-default --backbone runs/default/backbone --ecm runs/default/ecm-canny/ecm.safetensors \
	    --ecm runs/default/ecm-lowres/ecm.safetensors

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

# Several controls at once, inpainting and outpainting on the embedded default (a few minutes): composable.json.
bench-compose: setup
	$(BIN)/python benchmarks/composable.py --json composable.json

# ecm-demo's page against ecm-run, same engine and seed (about a minute): the README's figures and screenshot.
bench-demo: setup browser
	$(BIN)/python benchmarks/demo.py --screenshot docs/ecm-demo.png

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
