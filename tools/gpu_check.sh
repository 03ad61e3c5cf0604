#!/usr/bin/env bash
# The GPU checks behind BENCHMARKS.md's GPU section and docs/fidelity.md's CUDA notes, in one run on a machine
# with a CUDA device, from the repository root (the runtime's packages installed, this tree on PYTHONPATH):
#   ref:   LITE's own numbers on CUDA: tools/check_lite_reference.py with PyTorch's default (cuDNN TF32) and
#          with TF32 off;
#   bench: benchmarks/gpu_bench.py: 224-px memory and tasks/s table, bf16 vs fp32, the 16 GB question, the
#          test path's images/s, the trainer's wait for episodes;
#   speed: benchmarks/gpu_bench.py --vs-previous: real 224-px LITE training (loader with 8 workers, H = 40,
#          float32 without TF32) of this tree against the previous release, interleaved: tasks/s, 10,000-task
#          time, CUDA peak (the previous tree: `git archive` into bench-out/previous-<commit> where there is
#          history; elsewhere carry that folder, extracted by any earlier run of this step or of `make bench`);
#   demo:  `make demo`'s recipe with LITE meta-trained for DEMO_SECONDS (far more tasks than `make demo`
#          affords on two CPU cores), then `lite-train test` of the random, pretrained and meta-trained models
#          on the held-out demo classes. The demo records are written with the converter's own
#          TFRecord encoder (convert.tfrecord, byte-equal to TF's serialization: tests/convert), so the GPU
#          machine needs no TensorFlow.
# Each step writes its output under OUT_DIR as it goes; a failing step does not stop the next.
#
# Usage: tools/gpu_check.sh REFERENCE_DIR OUT_DIR [DEMO_SECONDS] [TEST_EPISODES]
#   env STEPS (default "ref speed bench demo") picks steps; DEVICE (default cuda) the demo's device.
set -u
REF=$1
OUT=$2
DEMO_SECONDS=${3:-120}
TEST_EPISODES=${4:-100}
PY=${PYTHON:-python3}
STEPS=${STEPS:-ref speed bench demo}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
step() { echo "== $* ($(date -u +%H:%M:%S))"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/machine.txt"
$PY -c 'import torch, numpy, os; print("torch", torch.__version__, "CUDA", torch.version.cuda, "numpy",
numpy.__version__, "cpus", os.cpu_count())' | tee -a "$OUT/machine.txt"

if has ref; then
    step "LITE reference on CUDA"
    $PY tools/check_lite_reference.py "$REF" --device cuda 2>&1 | tee "$OUT/reference_cuda.txt"
    $PY tools/check_lite_reference.py "$REF" --device cuda --no-tf32 2>&1 | tee "$OUT/reference_cuda_no_tf32.txt"
fi

if has speed; then
    step "GPU training vs the previous release"
    $PY -m benchmarks.gpu_bench --vs-previous --workers 8 --out "$OUT/gpu_training_vs_previous.md" 2>&1 | tail -n 20
fi

if has bench; then
    step "GPU benchmark"
    $PY -m benchmarks.gpu_bench --out "$OUT/gpu_bench.md" 2>&1 | tail -n 60
fi

if has demo; then
    step "demo on $DEVICE"
    D=$(mktemp -d)
    cat >"$D/records.py" <<'EOF'
import sys
import convert.demo_data as demo
from convert.tfrecord import encode_md_example, write_records
demo.write_md_records = lambda path, images, label: write_records(path, (encode_md_example(i, label) for i in images))
demo.write_demo_data(sys.argv[1], seed=0)
EOF
    # `make demo`'s recipe (random and pretrained backbones, LITE meta-trained on glyphs), with LITE trained
    # for DEMO_SECONDS instead of 400 tasks (stopped by SIGTERM, which saves checkpoint.pt).
    PRE="--data $D/shards --sources mnist,demo_textures --image-size 32 --num-workers 6 --device $DEVICE"
    $PY "$D/records.py" "$D/records" && \
    $PY -m convert.cli md --records "$D/records" --out "$D/shards" --workers 8 >/dev/null && \
    $PY -m convert.cli mnist --idx-dir "$D/records/mnist_idx" --out "$D/shards" >/dev/null && \
    $PY -m lite_train.cli pretrain $PRE --out "$D/random" --epochs 0 2>&1 | tail -n 2 && \
    $PY -m lite_train.cli pretrain $PRE --out "$D/pretrain" --epochs 6 --augment crop 2>&1 | tail -n 3 && \
    timeout -s TERM "$DEMO_SECONDS" $PY -m lite_train.cli train --data "$D/shards" --out "$D/run" \
        --sources demo_glyphs --val-sources none --backbone-weights "$D/pretrain/backbone.pt" --image-size 32 \
        --iterations 1000000 --tasks-per-step 2 --h 10 --max-way-train 5 --max-support-train 20 \
        --max-query-train 4 --learning-rate 0.002 --num-workers 6 --checkpoint-every 500 \
        --device "$DEVICE" 2>&1 | tail -n 5
    { head -n 1 "$D/run/metrics.csv"; tail -n 3 "$D/run/metrics.csv"; } | tee "$OUT/demo_train_tail.csv"
    $PY -m lite_train.cli test --checkpoint "$D/random/backbone.pt" --checkpoint "$D/pretrain/backbone.pt" \
        --checkpoint "$D/run/checkpoint.pt" --labels "random backbone,pretrained backbone,pretrained + LITE" \
        --data "$D/shards" --sources demo_glyphs,demo_textures --episodes "$TEST_EPISODES" \
        --num-workers 6 --device "$DEVICE" --out "$D/test" 2>&1 | tee "$OUT/demo_test.txt"
    cp "$D"/test/*.json "$OUT/" 2>/dev/null
    rm -rf "$D"
fi

step done
