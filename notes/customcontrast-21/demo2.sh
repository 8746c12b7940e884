#!/bin/bash
# Issue 21 item 3, second try: demo.sh's demonstration over a CLIP image encoder trained on toy-world views first
# (pretrain_image_encoder.py), so "other views of the same subject" are close in its features. One encoder per call,
# each in its own PERSONA_HOME, so the two run side by side on two cores; compare the two quality.json files.
# usage: demo2.sh IMAGE_ENCODER_FOLDER OUT_DIR full|ablated [SEEDS]
clip=$1; out=$2; tag=$3; seeds=${4:-1}
cd /work/main
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PERSONA_HOME=$out/home_$tag
mkdir -p $out
start=$(date +%s)
[ -d $out/views ] || .venv/bin/python -c "from persona.bench.toyworld_views import write_multiview_dataset as w
w('$out/views', subjects=16, views=4, seed=0, size=64)"
flags=(); [ $tag = ablated ] && flags=(--no-cscl --no-macl)
[ -s $out/enc_$tag.json ] || .venv/bin/persona-cli --json encoder train $out/views --base-model ../shared/toyworld/base \
  --image-encoder $clip --steps 1000 --lr 1e-4 "${flags[@]}" > $out/enc_$tag.json 2> $out/enc_$tag.err
echo "$tag encoder rc=$? at $(( $(date +%s) - start )) s" >> $out/demo.log
encoder=$(python3 -c "import json;print(json.load(open('$out/enc_$tag.json'))['encoder_id'])")
.venv/bin/persona-cli --json bench quality --seeds $seeds -n 8 --encoder $encoder \
  --report $out/quality_$tag.html > $out/quality_$tag.json 2> $out/quality_$tag.err
echo "$tag bench rc=$? at $(( $(date +%s) - start )) s" >> $out/demo.log
