#!/usr/bin/env bash
# The baselines table of docs/results/baselines.md: reference libraries (bitsandbytes, llm-compressor, fp16)
# next to macq's NF4 / FP4 / GPTQ / AWQ at the same settings, on the default model, one eval text.
#   python scripts/bench.py baselines_table [OUT_DIR] [DEVICE]      # DEVICE cpu (default) or cuda
# Short, affordable settings: wiki eval split, first 2048 tokens, 512-token windows; calibration 16 x 256
# tokens of c4 (seed 0, the same ids for macq and llm-compressor); latency prompt 128, 32 new tokens,
# median of 3 after 1 warm-up, 1 torch thread. GPU rows need DEVICE=cuda on a CUDA machine.
# macq's rows: NF4/FP4 through torch (MLX has no NF4/FP4 format), GPTQ/AWQ through mlx_lm, and all four
# exported to Core ML (the default ANE graph, context 512) and run by MIL value inference on Linux (the graph
# check: every window through the prefill function; decode is checked by the tests) or Core ML on a Mac.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-out/baselines}
DEV=${2:-cpu}
MACQ=${MACQ:-macq}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EVAL=(--dataset wiki --max-tokens 2048 --context 512)
CAL=(--calib-dataset c4 --n-calib 16 --seq-len 256 --seed 0)
mkdir -p "$OUT/runs" "$OUT/q"
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; }

for r in fp16 bnb-nf4 bnb-fp4 bnb-int8; do
  step "$r"
  [ -f "$OUT/runs/$r-$DEV.json" ] || $MACQ baseline --runner "$r" --device "$DEV" "${EVAL[@]}" --threads 1 \
      --out "$OUT/runs/$r-$DEV.json" --label "$r (reference)"
done

# macq at the same settings (records are the seam: quantize once, evaluate in torch or export to MLX)
step "macq quantize nf4 / fp4 / gptq / awq"
[ -d "$OUT/q/nf4" ] || $MACQ quantize --method nf4 --block-size 64 --double-quant -o "$OUT/q/nf4"
[ -d "$OUT/q/fp4" ] || $MACQ quantize --method fp4 --block-size 64 --double-quant -o "$OUT/q/fp4"
[ -d "$OUT/q/gptq" ] || $MACQ quantize --method gptq --bits 4 --group-size 64 --symmetric --no-mse-clip "${CAL[@]}" -o "$OUT/q/gptq"
[ -d "$OUT/q/awq" ] || $MACQ quantize --method awq --bits 4 --group-size 64 --asymmetric "${CAL[@]}" -o "$OUT/q/awq"

step "reference GPTQ (llm-compressor, own venv), compared per layer with macq's GPTQ records"
[ -f "$OUT/runs/gptq-$DEV.json" ] || $MACQ baseline --runner gptq --device "$DEV" --bits 4 --group-size 64 --symmetric \
    "${CAL[@]}" "${EVAL[@]}" --threads 1 --compare "$OUT/q/gptq" \
    --out "$OUT/runs/gptq-$DEV.json" --label "gptq (llm-compressor)"

step "reference AWQ (llm-compressor, own venv)"
[ -f "$OUT/runs/awq-$DEV.json" ] || $MACQ baseline --runner awq --device "$DEV" --bits 4 --group-size 64 --asymmetric \
    "${CAL[@]}" "${EVAL[@]}" --threads 1 --out "$OUT/runs/awq-$DEV.json" --label "awq (llm-compressor)"

for m in nf4 fp4; do
  step "macq $m through torch (MLX has no NF4/FP4 lookup-table format)"
  [ -f "$OUT/runs/macq-$m-torch.json" ] || $MACQ eval "$OUT/q/$m" "${EVAL[@]}" --latency --device cpu \
      --out "$OUT/runs/macq-$m-torch.json" --label "macq $m"
done
for m in gptq awq; do
  step "macq $m -> MLX export, evaluated through mlx_lm"
  [ -d "$OUT/q/$m-mlx" ] || $MACQ export "$OUT/q/$m" --target mlx -o "$OUT/q/$m-mlx"
  [ -f "$OUT/runs/macq-$m-mlx.json" ] || $MACQ eval "$OUT/q/$m-mlx" "${EVAL[@]}" --reference default --latency \
      --out "$OUT/runs/macq-$m-mlx.json" --label "macq $m"
done
for m in nf4 fp4 gptq awq; do
  step "macq $m -> Core ML (ANE graph), graph check / Core ML prediction"
  [ -d "$OUT/q/$m.mlpackage" ] || $MACQ export "$OUT/q/$m" --target coreml --context 512 -o "$OUT/q/$m.mlpackage"
  [ -f "$OUT/runs/macq-$m-coreml.json" ] || $MACQ eval "$OUT/q/$m.mlpackage" "${EVAL[@]}" --reference default \
      --decode-tokens 0 --out "$OUT/runs/macq-$m-coreml.json" --label "macq $m"
done
step "report"
$MACQ report "$OUT"/runs/*.json -o "$OUT/report" --force \
  --pending "fp16 / bnb-nf4 / bnb-fp4 / bnb-int8 / gptq / awq on CUDA=not run: no GPU lent to this task" \
  --pending "macq on MLX Metal / Core ML ANE=not run: no Mac here"
step done
