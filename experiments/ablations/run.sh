#!/usr/bin/env bash
# One-at-a-time ablation of every activation, norm, positional and attention option on the sequence task.
# All jobs land in one sweep dir (subdirs named by their overrides), summarised by tiny_decoder.report.
set -euo pipefail
cd "$(dirname "$0")/../.."
SWEEP=${SWEEP:-multirun/ablations_sequence}
common=(+experiment=sequence_ablation "hydra.sweep.dir=$SWEEP" "hydra.sweep.subdir=\${hydra.job.override_dirname}"
        "hydra.job.config.override_dirname.exclude_keys=[experiment]")
python -m tiny_decoder.train -m "${common[@]}" activation=relu,gelu,swish,swiglu
python -m tiny_decoder.train -m "${common[@]}" norm=pre,post,none
python -m tiny_decoder.train -m "${common[@]}" norm.kind=rmsnorm
python -m tiny_decoder.train -m "${common[@]}" positional=learned,sinusoidal,rope,alibi,numeric,none
python -m tiny_decoder.train -m "${common[@]}" attention=standard,sdpa
python -m tiny_decoder.train -m "${common[@]}" attention=longformer attention.window=4 attention.n_global=1
python -m tiny_decoder.train -m "${common[@]}" attention=linformer attention.k=4 attention.block_size=4
python -m tiny_decoder.report "$SWEEP" --out experiments/ablations
