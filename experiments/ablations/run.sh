#!/usr/bin/env bash
# One-at-a-time ablation of activation, norm, positional and attention options on the sequence task, 3 seeds per
# arm (conf/study/ablations.yaml): 45 jobs, 2 at a time, one torch thread each; rerun to resume. Then the report
# into this folder, and each job's results.json + overrides into runs/.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m tiny_decoder.train study=ablations
python -m tiny_decoder.report multirun/study/ablations --out experiments/ablations
for job in multirun/study/ablations/*/seed*; do
  dest=experiments/ablations/runs/${job#multirun/study/ablations/}
  mkdir -p "$dest" && cp "$job/results.json" "$job/.hydra/overrides.yaml" "$dest/"
done
cp multirun/study/ablations/study.yaml experiments/ablations/
