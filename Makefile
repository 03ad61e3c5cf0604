# Every target builds .venv from nothing when it is missing or older than pyproject.toml / constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
DATA ?= data
RECORDS ?=

.PHONY: venv test demo convert bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[convert,test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The main job on embedded demo data: write real-format MD records, convert, verify, sample episodes.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/lite-convert demo-data $(DEMO)/records
	$(BIN)/lite-convert md --records $(DEMO)/records --out $(DEMO)/shards --workers 2
	$(BIN)/lite-convert mnist --idx-dir $(DEMO)/records/mnist_idx --out $(DEMO)/shards
	$(BIN)/lite-convert verify $(DEMO)/shards --decode --records $(DEMO)/records
	$(BIN)/lite-train describe --data $(DEMO)/shards --source demo_glyphs --split test --seed 0 --count 3
	$(BIN)/lite-train episodes --data $(DEMO)/shards --source demo_glyphs --split test --seed 0 --n 2 --out $(DEMO)/episodes.png
	@echo "demo: converted shards in $(DEMO)/shards, episode picture in $(DEMO)/episodes.png"

# Convert real Meta-Dataset records: make convert RECORDS=/path/to/records [DATA=data]
convert: $(STAMP)
	@test -n "$(RECORDS)" || { echo "usage: make convert RECORDS=<MD records root> [DATA=<out>]"; exit 2; }
	$(BIN)/lite-convert md --records $(RECORDS) --out $(DATA) --workers 2
	$(BIN)/lite-convert verify $(DATA) --records $(RECORDS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out BENCHMARKS.md

clean:
	rm -rf $(VENV) $(DEMO) bench-out .pytest_cache
