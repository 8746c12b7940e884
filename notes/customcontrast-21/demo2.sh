#!/bin/bash
# Issue 21 item 3, second try: the same demonstration as demo.sh, but over a CLIP image encoder trained on toy-world
# views first (pretrain_image_encoder.py), so "other views of the same subject" are close in its features.
# usage: demo2.sh IMAGE_ENCODER_FOLDER OUT_DIR [SEEDS]
clip=$1; out=$2; seeds=${3:-1}
cd /work/main
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PERSONA_HOME=$out/home
mkdir -p $out
start=$(date +%s)
.venv/bin/python -c "from persona.bench.toyworld_views import write_multiview_dataset as w; w('$out/views', subjects=16, views=4, seed=0, size=64)"
for tag in full ablated; do
  flags=(); [ $tag = ablated ] && flags=(--no-cscl --no-macl)
  .venv/bin/persona-cli --json encoder train $out/views --base-model ../shared/toyworld/base --image-encoder $clip \
    --steps 1000 --lr 1e-4 "${flags[@]}" > $out/enc_$tag.json 2> $out/enc_$tag.err
  echo "$tag rc=$? at $(( $(date +%s) - start )) s" >> $out/demo.log
done
full=$(python3 -c "import json;print(json.load(open('$out/enc_full.json'))['encoder_id'])")
ablated=$(python3 -c "import json;print(json.load(open('$out/enc_ablated.json'))['encoder_id'])")
.venv/bin/persona-cli --json bench quality --seeds $seeds -n 8 --encoder $full --encoder $ablated \
  --report $out/quality.html > $out/quality.json 2> $out/quality.err
echo "bench rc=$? at $(( $(date +%s) - start )) s" >> $out/demo.log
