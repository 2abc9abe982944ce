#!/usr/bin/env bash
# The testbed evaluation of issue #4: aligned base, adapters/mix_s0 and a DDI-pruned mix_s0 (top 10),
# 100 AdvBench rows + 100 XSTest safe prompts (ids from eval_subsets.json) + the first 100 DialogSum
# validation dialogues. Resumable: generations are cached in $CACHE, so rerunning continues where it stopped.
# Usage: bash benchmarks/eval_testbed.sh [OUT_DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
MODELS=${MODELS:-${SAFEPRUNE_TESTBED_MODELS:-../models}}
OUT=${1:-$ROOT/benchmarks/results/eval_testbed}
PRUNED=${PRUNED:-/tmp/mix_s0_ddi10}
CACHE=${CACHE:-/tmp/safeprune_eval_cache.jsonl}
PY=${PY:-python}
export PYTHONPATH=$ROOT/src
sp() { "$PY" -c 'from safeprune.cli import main; main()' "$@"; }
[ -d "$PRUNED" ] || sp prune "$SHARED/testbed/adapters/mix_s0" --base "$MODELS/aligned" --top 10 -o "$PRUNED"
sp eval --base "$MODELS/aligned" --adapter lora="$SHARED/testbed/adapters/mix_s0" --adapter pruned="$PRUNED" \
    --no-adapter-baseline \
    --safety "$SHARED/data/advbench/harmful_behaviors.csv" \
    --over-refusal "$SHARED/data/xstest/xstest_prompts.csv" \
    --utility "$SHARED/data/dialogsum/validation.jsonl" \
    --rows-from "$SHARED/testbed/eval_subsets.json" --limit 100 --threads 1 --cache "$CACHE" -o "$OUT"
sp compare "$OUT" --a base --b lora
sp compare "$OUT" --a lora --b pruned
