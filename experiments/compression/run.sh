#!/usr/bin/env bash
# The compression study (experiments/compression/README.md): every training run on the sequence task, then the
# post-training measurements, then the tables and plots. 3000 steps a run (sequence_ablation, pinned), one thread.
#   bash experiments/compression/run.sh              # all stages
#   bash experiments/compression/run.sh measure report
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/compression}
STAGES=${*:-train measure report}
export OMP_NUM_THREADS=1

train() {
  local name=$1
  shift
  python -m tiny_decoder.train +experiment=sequence_ablation trainer.max_epochs=3 logger=csv trainer.enable_progress_bar=false \
    "~callbacks.rich_progress_bar" "hydra.run.dir=$OUT/$name" "$@"
}
best() { python -c "import json, sys; print(json.load(open(sys.argv[1]))['best_checkpoint'])" "$OUT/$1/results.json"; }

if [[ $STAGES == *train* ]]; then
  # magnitude pruning: 3 layers of width 64, gradual (cubic) from step 750 to 2250 of 3000, each Linear to s
  for s in 0.0 0.25 0.5 0.75 0.9; do train "magnitude_$s" pruning=magnitude "pruning.sparsity=$s"; done
  for s in 0.75 0.9; do train "magnitude_global_$s" pruning=magnitude "pruning.sparsity=$s" pruning.scope=global; done
  # the teacher (4 layers of width 64) and a student with half its layers and width, alone and distilled (3 seeds)
  train teacher model.n_layers=4
  student=(model.d_model=32 model.n_layers=2 model.d_ff=128)
  kd=(distillation=kd "distillation.teacher_ckpt=$(best teacher)")
  train student "${student[@]}"
  train student_kd "${student[@]}" "${kd[@]}"
  for seed in 1 2; do
    train "student_seed$seed" "${student[@]}" "seed=$seed"
    train "student_kd_seed$seed" "${student[@]}" "${kd[@]}" "seed=$seed"
  done
  # dynamic depth on the teacher's shape
  train layerdrop model.n_layers=4 depth=layerdrop depth.p=0.2
  train early_exit model.n_layers=4 depth=early_exit
fi
if [[ $STAGES == *measure* ]]; then
  python benchmarks/compression.py measure "$OUT" --out experiments/compression
fi
if [[ $STAGES == *report* ]]; then
  python benchmarks/compression.py report "$OUT" --out experiments/compression
fi
