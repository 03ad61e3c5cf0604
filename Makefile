# Every target builds .venv from nothing when it is missing or older than pyproject.toml / constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
DEMO_SEED ?= 0
DEMO_EPOCHS ?= 6
DEMO_TASKS ?= 400
DEMO_LR ?= 0.002
DEMO_TEST_EPISODES ?= 30
DATA ?= data
RECORDS ?=

.PHONY: venv test demo convert bench bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[convert,test]"
	touch $(STAMP)

# One test process per core, each pinned to its core (tests/conftest.py), a file's tests in one process (its
# fixtures built once); --durations: the slowest tests stay visible (the suite is meant to run in under 3
# minutes on 2 cores).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=20

# The main job on embedded demo data (README, "What make demo shows"): write real-format MD records, convert,
# verify; a random and a pretrained backbone (training classes of MNIST and textures, as LITE's backbone is
# pretrained on ImageNet); LITE meta-trained on the training classes of glyphs; all three tested on the same
# episodes of the held-out test classes of glyphs and textures.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/lite-convert demo-data $(DEMO)/records
	$(BIN)/lite-convert md --records $(DEMO)/records --out $(DEMO)/shards
	$(BIN)/lite-convert mnist --idx-dir $(DEMO)/records/mnist_idx --out $(DEMO)/shards
	$(BIN)/lite-convert verify $(DEMO)/shards --decode --records $(DEMO)/records
	$(BIN)/lite-train episodes --data $(DEMO)/shards --source demo_glyphs --split test --seed 0 --n 2 --image-size 84 \
		--out $(DEMO)/episodes.png
	$(BIN)/lite-train pretrain --data $(DEMO)/shards --sources mnist,demo_textures --out $(DEMO)/random \
		--image-size 32 --epochs 0 --num-workers 0 --seed $(DEMO_SEED)
	$(BIN)/lite-train pretrain --data $(DEMO)/shards --sources mnist,demo_textures --out $(DEMO)/pretrain \
		--image-size 32 --epochs $(DEMO_EPOCHS) --augment crop --num-workers 0 --seed $(DEMO_SEED)
	$(BIN)/lite-train train --data $(DEMO)/shards --out $(DEMO)/run --sources demo_glyphs \
		--val-sources none --backbone-weights $(DEMO)/pretrain/backbone.pt --image-size 32 --iterations $(DEMO_TASKS) \
		--tasks-per-step 2 --h 10 --max-way-train 5 --max-support-train 20 --max-query-train 4 \
		--learning-rate $(DEMO_LR) --num-workers 0 --checkpoint-every 100 --seed $(DEMO_SEED)
	$(BIN)/lite-train test --checkpoint $(DEMO)/random/backbone.pt --checkpoint $(DEMO)/pretrain/backbone.pt \
		--checkpoint $(DEMO)/run/fully_trained.pt --labels "random backbone,pretrained backbone,pretrained + LITE" \
		--data $(DEMO)/shards --sources demo_glyphs,demo_textures --episodes $(DEMO_TEST_EPISODES) --num-workers 0 \
		--seed $(DEMO_SEED) \
		--out $(DEMO)/test
	@echo "demo: curves in $(DEMO)/pretrain/curves.png and $(DEMO)/run/curves.png, test results in $(DEMO)/test"

# Convert real Meta-Dataset records: make convert RECORDS=/path/to/records [DATA=data]
convert: $(STAMP)
	@test -n "$(RECORDS)" || { echo "usage: make convert RECORDS=<MD records root> [DATA=<out>]"; exit 2; }
	$(BIN)/lite-convert md --records $(RECORDS) --out $(DATA)
	$(BIN)/lite-convert verify $(DATA) --records $(RECORDS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out BENCHMARKS.md

# Every benchmark row at tiny sizes (bench-out/BENCHMARKS.quick.md): checks that the benchmarks still run.
bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) $(DEMO) bench-out .pytest_cache
