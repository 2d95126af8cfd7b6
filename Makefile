# `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEMO_RUNS := runs/demo/digits_sigma0.25.tsv runs/demo/digits_sigma0.50.tsv
DEMO_LABELS := "sigma=0.25,sigma=0.50"

.PHONY: demo test test-slow bench lint clean

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

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m bench.run --out runs/bench.json

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
