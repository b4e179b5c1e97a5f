#!/usr/bin/env bash
# The GPU checks of issue 12 as one prepared script, for a machine with a CUDA device (the `device` tool's
# `run`, which copies the working tree; carry .venv). Writes everything under ${OUT:-build/gpu}:
#   gpu_tests.log          the `gpu`-marked tests (tests/test_scoring_gpu.py, tests/test_clip_speed.py)
#   vitl14_pil.json        bench/score_clip.py, ViT-L-14 (random weights) from JPEG shards, exact PIL decode
#   vitl14_nvjpeg.json     the same with `decode: torchvision` (nvJPEG + resize on the GPU)
#   nvidia-smi.txt         the device
# Goal (issue 12): >= 2,000 samples/s end to end per H100-class GPU. Record the figures with this command
# in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu}"
mkdir -p "$OUT"
PY=.venv/bin/python
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
HF_HUB_OFFLINE=1 timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_scoring_gpu.py tests/test_clip_speed.py \
  > "$OUT/gpu_tests.log" 2>&1 || echo "gpu tests failed: see $OUT/gpu_tests.log"
for decode in pil torchvision; do
  name=$([ "$decode" = pil ] && echo pil || echo nvjpeg)
  HF_HUB_OFFLINE=1 timeout 200 $PY bench/score_clip.py --model ViT-L-14 --device cuda --samples "${SAMPLES:-8192}" \
    --per-shard 512 --batch-size 256 --decode "$decode" --json > "$OUT/vitl14_$name.log" 2>&1 \
    && tail -n 1 "$OUT/vitl14_$name.log" > "$OUT/vitl14_$name.json" || echo "ViT-L-14 $decode failed: see $OUT/vitl14_$name.log"
done
tail -n 3 "$OUT/gpu_tests.log"; cat "$OUT"/vitl14_*.json 2>/dev/null || true
