#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine, from the repository root (results under $OUT, default
# benchmarks/results/gpu):
#   1. the CUDA tests (skipped on machines without a GPU): the repair's gates, NLLs and gradients on CUDA equal
#      the CPU's, `repair --device cuda` writes the CPU's adapter, the continuous generation loop's float64 tokens
#      equal HF generate's on the GPU;
#   2. bench_repair_scale.py --device cuda: one fit step at Llama-2-7B shapes, 2/8/32 layers, plain and
#      checkpointed, with the GPU memory above the loaded model;
#   3. gpu_scan_check.py: scan (DDI, SafeLoRA, SPLoRA) on CUDA against the CPU at 7B shapes;
#   4. bench_repair_offload.py --device cuda: the checkpointed fit step without and with `--offload cpu` (the
#      layers' inputs in pinned host memory): GPU memory above the loaded model against the layer count.
# Parts: PARTS="tests repair scan offload" (default all).
# Needs the project's Python dependencies importable (PYTHONPATH=src is set here).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
LAYERS=${LAYERS:-2,8,32}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' >>"$OUT/gpu.txt"
PARTS=${PARTS:-tests repair scan offload}
[[ $PARTS == *tests* ]] && python3 -m pytest -q tests/test_repair.py tests/test_generation_loop.py -k cuda 2>&1 | tee "$OUT/pytest_cuda.log"
[[ $PARTS == *repair* ]] && python3 benchmarks/bench_repair_scale.py --device cuda --layers "$LAYERS" --batch 16 --prompt-tokens 120 --steps 3 \
    --workdir "${WORKDIR:-/tmp/repair_scale}" --out "$OUT/repair_scale_gpu" 2>&1 | tee "$OUT/bench.log"
# 3. scan --device cuda against the CPU at 7B shapes (DDI, SafeLoRA, SPLoRA): seconds and score agreement
[[ $PARTS == *scan* ]] && python3 benchmarks/gpu_scan_check.py --layers "${SCAN_LAYERS:-4}" --workdir "${WORKDIR:-/tmp/repair_scale}/scan" \
    --out "$OUT/scan_gpu.json" 2>&1 | tee "$OUT/scan_gpu.log"
# 4. --offload cpu on the GPU: the fit's GPU memory against the layer count (same models as part 2)
[[ $PARTS == *offload* ]] && python3 benchmarks/bench_repair_offload.py --device cuda --layers "$LAYERS" --batch 16 --prompt-tokens 120 \
    --steps 3 --workdir "${WORKDIR:-/tmp/repair_scale}" --out "$OUT/repair_offload_gpu" 2>&1 | tee "$OUT/offload.log"
