#!/usr/bin/env bash
# The research roadmap on TinyStories, one change at a time from the baseline, 3 seeds per
# arm (conf/study/roadmap.yaml): 132 jobs (post-training arms reuse the baselines' checkpoints), 2 at a time, one torch thread each; rerun to resume. Then the report
# into this folder, and each job's results.json + overrides into runs/.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m tiny_decoder.train study=roadmap
python -m tiny_decoder.report multirun/study/roadmap --out experiments/roadmap
for job in multirun/study/roadmap/*/seed*; do
  dest=experiments/roadmap/runs/${job#multirun/study/roadmap/}
  mkdir -p "$dest" && cp "$job/results.json" "$job/.hydra/overrides.yaml" "$dest/"
done
cp multirun/study/roadmap/study.yaml experiments/roadmap/
