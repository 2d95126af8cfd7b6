# `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEMO_RUNS := runs/demo/digits_sigma0.25.tsv runs/demo/digits_sigma0.50.tsv
DEMO_LABELS := "sigma=0.25,sigma=0.50"

.PHONY: demo demo-imagenet test test-slow bench lint clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[models,test]'
	touch $(STAMP)

# Certify the digits test split with the shipped models (no network, no GPU), then
# tabulate and plot. A rerun resumes the finished files, so it takes seconds.
demo: $(STAMP)
	$(BIN)/certify --sigma 0.25 --out runs/demo/digits_sigma0.25
	$(BIN)/certify --sigma 0.50 --out runs/demo/digits_sigma0.50
	$(BIN)/analyze $(DEMO_RUNS) --labels $(DEMO_LABELS) --plot runs/demo/certified_accuracy
	$(BIN)/analyze $(DEMO_RUNS) --labels $(DEMO_LABELS) --format markdown > runs/demo/table.md

# Real weights nobody here trained, offline on the CPU: EfficientNet-Lite0 (ImageNet) on
# foolbox's 20 labelled ImageNet images, with and without the FFDNet denoiser (denoised
# smoothing, Salman et al. 2020). n = 100 keeps it to minutes on 2 cores (FFDNet costs
# ~4x the classifier per noisy copy); a rerun resumes the finished files.
IMAGENET_STAMP := $(VENV)/.installed-imagenet-demo
IMAGENET_OUT := runs/demo-imagenet
IMAGENET_ARGS := --model efficientnet-lite0 --dataset imagenet-samples --sigma 0.12 \
	--batch 60 --device cpu
IMAGENET_RUNS := $(IMAGENET_OUT)/certify.tsv $(IMAGENET_OUT)/certify_ffdnet.tsv
IMAGENET_TABLE := $(IMAGENET_RUNS) --labels "efficientnet-lite0,ffdnet+efficientnet-lite0" \
	--radii 0,0.05,0.1,0.15

$(IMAGENET_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[models,test,imagenet-demo]'
	touch $(IMAGENET_STAMP)

demo-imagenet: $(IMAGENET_STAMP)
	$(BIN)/predict $(IMAGENET_ARGS) --n 100 --out $(IMAGENET_OUT)/predict
	$(BIN)/certify $(IMAGENET_ARGS) --n0 20 --n 100 --out $(IMAGENET_OUT)/certify
	$(BIN)/certify $(IMAGENET_ARGS) --n0 20 --n 100 --denoiser ffdnet --out $(IMAGENET_OUT)/certify_ffdnet
	$(BIN)/analyze $(IMAGENET_TABLE)
	$(BIN)/analyze $(IMAGENET_TABLE) --format markdown > $(IMAGENET_OUT)/table.md

# The tests run the real-weight models too, so they install the demo's extra.
test: $(STAMP) $(IMAGENET_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) $(IMAGENET_STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m bench.run --out runs/bench.json

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
