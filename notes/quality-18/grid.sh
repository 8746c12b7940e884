#!/bin/bash
# usage: grid.sh TAG METHOD "SUBJECTS" EXTRA-ARGS...
tag=$1; method=$2; subjects=$3; shift 3
cd /work/wt/q18
for s in $subjects; do
  OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PERSONA_HOME=/tmp/q18/home_$tag timeout 3000 .venv/bin/persona-cli --json bench quality ../shared/toyworld/references/$s --method $method --config case1+prior --config sid+prior "$@" --report /tmp/q18/grid/${tag}_$s.html > /tmp/q18/grid/${tag}_$s.json 2> /tmp/q18/grid/${tag}_$s.err
done
