#!/usr/bin/env bash
# The GPU benchmarks in one device call (README "Benchmarks"): what trainer.precision auto picks, the step's
# anatomy and its synchronisations (issue 25), end-to-end vs model-only images/s (issue 9), the image-folder
# pipelines (issue 16). From the repo root on the GPU machine, with .whl carried (the machine's image has
# torch, torchvision, pytorch-lightning and timm but not jsonargparse, which LightningCLI needs):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0   # here, once
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Each stage has its own time limit (the sum, 580 s, fits one call of a 15-minute device budget with the
# machine's start, if it is the first call); a stage that runs over is cut and the next one runs. Seen on
# an H200 (2026-12-04): environment 22 s, step anatomy 84 s, throughput 50 s, tests 22 s; writing the
# 2,000 JPEGs and the folder report took more than 80 s and the ResNet-50 stage more than 70 s. Logs go to $OUT (./gpu_check_out
# without one). PYTHON, DEVICE, SYNTHETIC, STEPS, BATCH, WORKERS and SKIP_TESTS override the defaults, so
# the script can be tried on a CPU (see the README).
set -uo pipefail
OUT=${OUT:-gpu_check_out}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SYNTHETIC=${SYNTHETIC:-50000}
STEPS=${STEPS:-45}
WORKERS=${WORKERS:-8}
BATCH=${BATCH:-0}  # 0: the config's 256
SKIP_TESTS=${SKIP_TESTS:-0}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

stage() {  # stage LOG SECONDS COMMAND...: run with a time limit, keep the output (warnings dropped) in $OUT/LOG
    local log=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/$log"
    echo "[$log: $((SECONDS - start)) s of at most $limit]" | tee -a "$OUT/$log"
}

stage environment.log 30 "$PYTHON" -c "
import torch, pytorch_lightning as pl
print('torch', torch.__version__, 'lightning', pl.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())
from ssl_lightning.precision import resolve_precision
print(*resolve_precision('auto', 'gpu')); print(*resolve_precision('auto', 'cpu'))"
# Issue 25: per method, data/forward/backward/optimizer/callbacks time, and steps under
# torch.cuda.set_sync_debug_mode("error") (ResNet-18 at 32 px, batch 256, the cifar10 configs).
stage step_anatomy.log 120 "$PYTHON" benchmarks/step_anatomy.py --device "$DEVICE" \
    --methods vicreg,byol,dino,mocov2,swav --steps 30 --warmup 10 --sync_steps 5 --workers "$WORKERS"
# ResNet-18 at 32 px, 2 views, bf16: end to end (b) vs model only (a), targets b/a >= 0.9, b/c >= 3.
stage throughput.log 90 "$PYTHON" benchmarks/throughput.py --device "$DEVICE" --config experiments/cifar10/vicreg.yaml \
    --synthetic "$SYNTHETIC" --steps "$STEPS" --skip $((STEPS / 3)) --workers "$WORKERS" --batch_size "$BATCH" \
    --pipeline_batches 20
if [ "$SKIP_TESTS" = 0 ]; then  # the batched views and the crops on the device (nvJPEG), CUDA tests included
    stage tests.log 40 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_batched_views.py \
        tests/test_image_folder_crops.py -m "not slow"
fi
# Image folders (issue 16): 2,000 synthetic JPEGs, per-sample vs decode-time crops + batched views vs GPU
# decoding, BYOL 2 x 224 and DINO 2 x 224 + 6 x 96. Batch 64: the 2 * workers + 1 untimed batches and the
# 10 timed ones must fit into the 2,000 images of one pass.
stage folder_throughput.log 160 "$PYTHON" benchmarks/throughput.py --device "$DEVICE" \
    --imagefolder /tmp/ssl-jpegs --workers "$WORKERS" --batch_size 64 --pipeline_batches 10
# ResNet-50 at 224 px, 2 views (BYOL recipe) on those JPEGs: end to end (b) vs model only (a); target b/a >= 0.9.
stage folder_resnet50.log 140 "$PYTHON" benchmarks/throughput.py --device "$DEVICE" \
    --config experiments/imagenet100/byol.yaml --workers "$WORKERS" --steps 24 --skip 8 --batch_size 128 \
    --cli_args "--data.data_dir /tmp/ssl-jpegs --data.labelled false --model.init_args.backbone resnet50"
