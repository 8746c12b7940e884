#!/bin/bash
# Issue 21 item 3's demonstration: an encoder with CSCL + MACL vs one without, on toy-world views, then bench quality
cd /work/main
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PERSONA_HOME=/work/cc21/home
start=$(date +%s)
for tag in full ablated; do
  flags=(); [ $tag = ablated ] && flags=(--no-cscl --no-macl)
  .venv/bin/persona-cli --json encoder train ${VIEWS:-/work/cc21/views} --base-model ../shared/toyworld/base --steps 1000 \
    --lr 1e-4 "${flags[@]}" > /work/cc21/enc_$tag.json 2> /work/cc21/enc_$tag.err
  echo "$tag rc=$? at $(( $(date +%s) - start )) s" >> /work/cc21/demo.log
done
full=$(python3 -c "import json;print(json.load(open('/work/cc21/enc_full.json'))['encoder_id'])")
ablated=$(python3 -c "import json;print(json.load(open('/work/cc21/enc_ablated.json'))['encoder_id'])")
.venv/bin/persona-cli --json bench quality --seeds 3 -n 8 --encoder $full --encoder $ablated \
  --report /work/cc21/quality.html > /work/cc21/quality.json 2> /work/cc21/quality.err
echo "bench rc=$? at $(( $(date +%s) - start )) s" >> /work/cc21/demo.log
