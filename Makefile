# Every target builds .venv from nothing when it is missing or older than pyproject.toml / constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
DEMO_TASKS ?= 120
DEMO_LR ?= 0.002
DEMO_TEST_EPISODES ?= 30
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
	$(BIN)/lite-convert md --records $(DEMO)/records --out $(DEMO)/shards
	$(BIN)/lite-convert mnist --idx-dir $(DEMO)/records/mnist_idx --out $(DEMO)/shards
	$(BIN)/lite-convert verify $(DEMO)/shards --decode --records $(DEMO)/records
	$(BIN)/lite-train describe --data $(DEMO)/shards --source demo_glyphs --split test --seed 0 --count 3
	$(BIN)/lite-train episodes --data $(DEMO)/shards --source demo_glyphs --split test --seed 0 --n 2 --out $(DEMO)/episodes.png
	@# Meta-train LITE briefly (random backbone with calibrated BN, 32 px), then test on the held-out classes
	@# next to the same model with identity FiLM (README: what this shows and what it does not).
	$(BIN)/lite-train train --data $(DEMO)/shards --out $(DEMO)/run --sources demo_textures,demo_glyphs,mnist \
		--val-sources none --image-size 32 --iterations $(DEMO_TASKS) --tasks-per-step 4 --h 10 \
		--max-way-train 5 --max-support-train 20 --max-query-train 4 --learning-rate $(DEMO_LR) \
		--calibration-images 200 --num-workers 1 --checkpoint-every 50
	$(BIN)/lite-train test --checkpoint $(DEMO)/run/checkpoint.pt --data $(DEMO)/shards \
		--sources demo_textures,demo_glyphs --episodes $(DEMO_TEST_EPISODES) --identity-film-baseline \
		--num-workers 1 --out $(DEMO)/test
	@echo "demo: shards in $(DEMO)/shards, episodes.png, run folder $(DEMO)/run, test results in $(DEMO)/test"

# Convert real Meta-Dataset records: make convert RECORDS=/path/to/records [DATA=data]
convert: $(STAMP)
	@test -n "$(RECORDS)" || { echo "usage: make convert RECORDS=<MD records root> [DATA=<out>]"; exit 2; }
	$(BIN)/lite-convert md --records $(RECORDS) --out $(DATA)
	$(BIN)/lite-convert verify $(DATA) --records $(RECORDS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out BENCHMARKS.md

clean:
	rm -rf $(VENV) $(DEMO) bench-out .pytest_cache
