"""Training entry point: ``python -m tiny_decoder.train +experiment=NAME [overrides]``.

``train(cfg)`` is a plain function (config -> data module + model -> task -> trainer -> results) that
returns the configured metric, so multirun sweeps can optimise it. Invalid configuration (also an out-of-range
value, a model too small for its data, a checkpoint that does not fit) fails before any training with one line
naming the field; results (metrics, wall time, parameter count) are written to ``results.json`` in the run's
output directory. A failing run leaves ``error.txt`` (exception type, message, traceback) there instead; in a
multirun the other jobs go on (the failed one returns NaN to the sweeper) and the multirun exits with code 1.

Resume: ``resume=PATH.ckpt``, or ``resume=auto``: the newest ``last.ckpt`` under ``paths.resume_dir`` written
by the same command (same overrides, ignoring ``resume``, ``paths.*``, ``logger*`` and the ``trainer.max_*``
budget). The resumed run logs to its own new directory (the original's logs stay as they are) and keeps
writing checkpoints next to the one it resumed from, so best-checkpoint tracking and ``last.ckpt`` carry on.
"""

from __future__ import annotations

from tiny_decoder.cli import hydra_tool
from tiny_decoder.run.fit import train

main = hydra_tool("train", train)
cli = main  # the console entry point's historical name

if __name__ == "__main__":
    main()
