#!/usr/bin/env bash
# Every GPU check of the generation issue (14) and the training issue (17) in ONE script, so that a session that
# is lent a GPU spends its device minutes on one call. From the project root:
#   here, once:      bash ../shared/gpu/prepare.sh          (the wheels the GPU machine lacks, into .gpu/)
#   on the GPU:      run(command="bash .gpu/run.sh bash tools/gpu_checks.sh", carry=[".gpu"], timeout_s=560)
# Each check runs under `timeout` and leaves CHECK.json (stdout), CHECK.log (stderr) and a line in summary.txt in
# $OUT. The default checks are bounded by 330 + 120 s (estimated from the first H200 run: ~290 s and ~90 s), so one
# call stays under 9 minutes with room for the machine's start.
#   generate  persona-cli bench generate --base-model sd15 --device cuda --batch 1 --batch 8 (Triton, embedded,
#             diffusers, diffusers + torch.compile; starts, hot-loads, memory)                       ≤ 330 s
#   train     persona-cli bench train --base-model sd15 --device cuda --mixed-precision fp16          ≤ 120 s
# Opt-in, for a second call (each its own minutes): GPU_CHECKS=compile (persona's embedded engine with
# torch.compile under its CUDA graphs, first and cached start), GPU_CHECKS=flow (photos → concept, 1000 LoRA
# steps at train's default batch — 4 photos + 4 class images a step since issue 18 — issue 17's 3-minute target),
# GPU_CHECKS=batch4 (bench train at that batch, and bench flow with 400 steps of it — SID's effect on the toy world
# needed the batch); several:
# GPU_CHECKS="generate train".
# Try it on a CPU with the tiny model and a few steps: GPU_CHECKS_TINY=1 bash tools/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
checks=${GPU_CHECKS:-generate train}

if [ "${GPU_CHECKS_TINY:-0}" = 1 ]; then
  model=tiny device=cpu
  generate_args=(--steps 2 --repeats 1 --warmup 0 --resolution 32 --batch 1 --batch 2)
  train_args=(--steps 2 --warmup 1 --resolution 32 --num-images 2)
  flow_args=(--steps 2 --resolution 32 --num-class-images 2)
  batch4_args=(--steps 2 --warmup 1 --resolution 32 --num-images 4 --batch-size 4)
  batch4_flow_args=(--steps 2 --resolution 32 --num-class-images 2 --batch-size 4)
  limits=(generate=600 train=300 compile=900 flow=600 batch4=600 batch4flow=600)
else
  model=sd15 device=cuda
  generate_args=(--batch 1 --batch 8)
  train_args=(--mixed-precision fp16)
  flow_args=(--steps 1000)  # train's default batch: the dog's photos, up to 4
  batch4_args=(--mixed-precision fp16 --num-images 4 --batch-size 4)
  batch4_flow_args=(--steps 400 --batch-size 4)
  limits=(generate=330 train=120 compile=400 flow=300 batch4=150 batch4flow=250)
fi
limit() { local pair; for pair in "${limits[@]}"; do [ "${pair%%=*}" = "$1" ] && echo "${pair#*=}"; done; }

check() {  # check NAME COMMAND…: runs it under its limit, JSON to $OUT/NAME.json, log to $OUT/NAME.log
  local name=$1 seconds started rc
  shift
  seconds=$(limit "$name")
  started=$(date +%s)
  echo "== $name (limit ${seconds}s): $*" >&2
  timeout -k 15 "$seconds" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - started ))s$([ "$rc" = 124 ] && echo " (timed out)")" | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/$name.log" >&2
}

{ date -u +"start %FT%TZ"; python3 -c 'import numpy, torch; print("numpy", numpy.__version__, "torch",
  torch.__version__, "cuda", torch.cuda.is_available())'; } >>"$OUT/summary.txt" 2>&1

for name in $checks; do
  case $name in
    generate) check generate persona-cli --json bench generate --base-model "$model" --device "$device" \
                "${generate_args[@]}" ;;
    train) check train persona-cli --json bench train --base-model "$model" --device "$device" "${train_args[@]}" ;;
    compile) check compile persona-cli --json bench generate --base-model "$model" --device "$device" \
               --path embedded-compile "${generate_args[@]}" ;;
    batch4) check batch4 persona-cli --json bench train --base-model "$model" --device "$device" "${batch4_args[@]}"
            flow_args=("${batch4_flow_args[@]}") name=batch4flow ;&
    flow)
      # Four noise photos (no photos travel to the GPU machine) and the base model as a folder (flow takes a path).
      python3 - "$OUT/photos" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
for index in range(4):
    pixels = np.random.default_rng(index).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f"{index}.png")
PY
      folder=$(python3 -c 'import sys
from persona.bench.models import bench_base_model, model_cache
print(bench_base_model(sys.argv[1], model_cache()))' "$model") || {
        echo "flow: no base model folder" | tee -a "$OUT/summary.txt"; continue; }
      check "$name" persona-cli --json bench flow "$OUT/photos" --base-model "$folder" "${flow_args[@]}" ;;
    *) echo "unknown check $name (generate, train, compile, flow, batch4)" | tee -a "$OUT/summary.txt" ;;
  esac
done
date -u +"end %FT%TZ" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
