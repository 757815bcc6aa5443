#!/usr/bin/env bash
# The worker's own GPU paths, end to end (bench/gpu_speed.py times the method; this runs real cells):
# tiny llama and mixtral cells, both recipes, trained and evaluated on CUDA in bf16, fp16 (loss
# scaling), QLoRA nf4 (probe through the quantized path) and int8; with 2+ GPUs, one more arm places
# the mixtral cells across every visible GPU. Ends with a table of every row it produced.
#   bash bench/gpu_cells.sh [results dir]     # on a GPU machine (PYTHON=... picks the interpreter)
#   PLAN_ONLY=1 bash bench/gpu_cells.sh       # anywhere: expands and validates every arm, runs nothing
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
out=${1:-$(mktemp -d "${TMPDIR:-/tmp}/aletheia-gpu-cells.XXXX")}
verb=launch
[ -n "${PLAN_ONLY:-}" ] && verb=plan

gpus=4  # plan only: validate every arm as on a 4-GPU machine
if [ -z "${PLAN_ONLY:-}" ]; then
  gpus=$("$py" -c "import torch; print(torch.cuda.device_count())")
  [ "$gpus" -ge 1 ] || { echo "gpu_cells: no CUDA device visible; nothing to check" >&2; exit 2; }
fi

# name precision quantization gpus-per-cell
arms=("bf16 bf16 none 1" "fp16 fp16 none 1" "nf4 bf16 nf4 1" "int8 bf16 int8 1")
if [ "$gpus" -ge 2 ]; then arms+=("spread bf16 none $gpus"); fi

for arm in "${arms[@]}"; do
  read -r name precision quantization n <<<"$arm"
  echo "== arm $name: precision $precision, quantization $quantization, $n GPU(s) per cell"
  models="[tiny-llama,tiny-mixtral]"
  [ "$name" = spread ] && models="[tiny-mixtral]"
  "$py" -m aletheia_hpc.cli "$verb" campaign=smoke cluster=local "results_dir=$out/$name" \
    "campaign.models=$models" "campaign.seeds=[42]" "model.resources.gpus=$n" \
    "model.precision=$precision" "model.quantization=$quantization" "cluster.gpus_per_node=$gpus"
done
[ "$verb" = plan ] && { echo "gpu_cells: every arm validates"; exit 0; }
[ "$gpus" -ge 2 ] || echo "gpu_cells: one GPU visible; the multi-GPU arm was skipped"

"$py" - "$out" <<'EOF'
import sys
from pathlib import Path
from aletheia_hpc.row import read_row
rows = [(path.parts[-5], read_row(path)) for path in sorted(Path(sys.argv[1]).glob("*/*/cells/*/row.json"))]
print(f"\n{'arm':6} {'model':13} {'recipe':9} {'status':8} {'device':6} {'prec':5} {'quant':5} "
      f"{'gpus':4} {'layers':>6} {'eval loss':>9} {'step s':>7}  gpu")
for arm, r in rows:
    m = r["config"]["model"]
    step = r["step_time_median_s"]
    print(f"{arm:6} {r['model']:13} {r['recipe']:9} {r['status']:8} {r['device'] or '-':6} "
          f"{m['precision']:5} {m['quantization']:5} {m['resources']['gpus']:4} "
          f"{len(r['selected_layers'] or []):>3}/{r['num_layers']:<2} "
          f"{r['eval_loss'] if r['eval_loss'] is not None else float('nan'):9.4f} "
          f"{step if step is not None else float('nan'):7.3f}  {r['gpu_name']}")
    if r["status"] != "ok":
        print(f"       failure: {r['failure_reason']}")
bad = sum(r["status"] != "ok" for _, r in rows)
print(f"\n{len(rows)} rows, {bad} not ok; results in {sys.argv[1]}")
sys.exit(1 if bad or not rows else 0)
EOF
