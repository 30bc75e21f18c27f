#!/usr/bin/env bash
# The GPU half of issue 9's benchmarks in one device call (README "Benchmarks"). From the repo root on
# the GPU machine, with .whl carried (the machine's image has torch, torchvision, pytorch-lightning and
# timm but not jsonargparse, which LightningCLI needs):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0   # here, once
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Logs go to $OUT (./gpu_check_out without one). PYTHON, DEVICE, SYNTHETIC, STEPS, BATCH and WORKERS
# override the defaults, so the script can be tried on a CPU (see the README).
set -uo pipefail
OUT=${OUT:-gpu_check_out}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SYNTHETIC=${SYNTHETIC:-50000}
STEPS=${STEPS:-60}
WORKERS=${WORKERS:-8}
BATCH=${BATCH:-0}  # 0: the config's 256
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$PYTHON" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__,
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee "$OUT/environment.log"
# The batched views on the device, the CUDA generator test included.
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_batched_views.py 2>&1 | tee "$OUT/tests.log"
# ResNet-18 at 32 px, 2 views, bf16 (the target: b/a >= 0.9, b/c >= 3).
"$PYTHON" benchmarks/throughput.py --device "$DEVICE" --config experiments/cifar10/vicreg.yaml \
    --synthetic "$SYNTHETIC" --steps "$STEPS" --skip $((STEPS / 3)) --workers "$WORKERS" --batch_size "$BATCH" \
    --pipeline_batches 20 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/throughput.log"
# Image folders (issue 16): the crop tests (decode: device runs nvJPEG here), then 2,000 synthetic JPEGs,
# per-sample vs decode-time crops + batched views vs GPU decoding, BYOL 2 x 224 and DINO 2 x 224 + 6 x 96.
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_image_folder_crops.py -m "not slow" 2>&1 | tee "$OUT/folder_tests.log"
(cd benchmarks && "$PYTHON" throughput.py --device "$DEVICE" --imagefolder /tmp/ssl-jpegs --workers "$WORKERS" \
    --batch_size 256 --pipeline_batches 10) 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/folder_throughput.log"
# ResNet-50 at 224 px, 2 views (BYOL recipe) on those JPEGs: end to end (b) vs model only (a); target b/a >= 0.9.
"$PYTHON" benchmarks/throughput.py --device "$DEVICE" --config experiments/imagenet100/byol.yaml --workers "$WORKERS" \
    --steps "$STEPS" --skip $((STEPS / 3)) --batch_size "$BATCH" \
    --cli_args "--data.data_dir /tmp/ssl-jpegs --data.labelled false --model.init_args.backbone resnet50" \
    2>&1 | grep -v "Warning\|warn(" | tee "$OUT/folder_resnet50.log"
