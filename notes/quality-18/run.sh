#!/bin/bash
# usage: run.sh TAG SUBJECT METHOD EXTRA-ARGS...
tag=$1; s=$2; method=$3; shift 3
cd /work/main
rm -rf /work/q18/home_${tag}_$s
start=$(date +%s)
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PERSONA_HOME=/work/q18/home_${tag}_$s timeout ${Q18_TIMEOUT:-5400} .venv/bin/persona-cli --json bench quality ../shared/toyworld/references/$s --method $method --config case1+prior --config sid+prior "$@" --report /work/q18/grid/${tag}_$s.html > /work/q18/grid/${tag}_$s.json 2> /work/q18/grid/${tag}_$s.err
echo "rc=$? seconds=$(( $(date +%s) - start ))" >> /work/q18/grid/${tag}_$s.err
