#!/bin/bash
# usage: FX=FIXTURES [SP=path/to/safeprune] run.sh OUTDIR   (from the repository root)
set -u
O=$1; rm -rf $O; mkdir -p $O
SP=${SP:-.venv/bin/safeprune}
FX=${FX:?set FX to the folder make_fixtures.py wrote}
export SAFEPRUNE_THREADS=1
run() { name=$1; shift; "$SP" -q "$@" > $O/$name.stdout 2> $O/$name.stderr; echo "$name rc=$?" >> $O/rc.txt; }
run scan_llama scan $FX/llama_ad --base $FX/llama --aligned $FX/llama --unaligned $FX/llama_u -m all --json $O/scan_llama.json --csv $O/scan_llama.csv
run scan_qwen scan $FX/qwen_ad --base $FX/qwen --json $O/scan_qwen.json
run prune_ddi prune $FX/llama_ad --base $FX/llama --top 3 -o $O/prune_ddi --json $O/prune_ddi.json
run prune_zero prune $FX/qwen_ad --base $FX/qwen --top 2 --mode zero -o $O/prune_zero
run prune_splora prune $FX/llama_ad --aligned $FX/llama --unaligned $FX/llama_u -m splora --top 4 -o $O/prune_splora
run prune_safelora_thr prune $FX/llama_ad --aligned $FX/llama --unaligned $FX/llama_u -m safelora --threshold 0.5 -o $O/prune_sl
run project project $FX/llama_ad --aligned $FX/llama --unaligned $FX/llama_u --top 3 -o $O/project
run scores_prune prune $FX/llama_ad --scores $O/scan_llama.json -m splora --top 2 -o $O/prune_scores
run autotau prune $FX/llama_ad --base $FX/llama --auto-tau knee -o $O/prune_knee
M=${SAFEPRUNE_TESTBED_MODELS:-../models}
if [ -d "$M/aligned" ]; then
 TB=../shared/testbed/adapters/mix_s0
 run tb_scan scan $TB --base $M/aligned --aligned $M/aligned --unaligned $M/unaligned -m all --json $O/tb_scan.json
 run tb_prune prune $TB --base $M/aligned --top 10 -o $O/tb_prune
 run tb_project project $TB --aligned $M/aligned --unaligned $M/unaligned --top 10 -o $O/tb_project
 run tb_splora prune $TB --aligned $M/aligned --unaligned $M/unaligned -m splora --top 10 -o $O/tb_splora
fi
