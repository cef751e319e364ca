"""LightningModules: thin task layers (loss, metrics, sampling) over the plain model.

Importing this package registers every task in ``TASKS`` so checkpoints can be reloaded by task name.
"""

from tiny_decoder.tasks import language_model, sequence_predictor  # noqa: F401
from tiny_decoder.tasks.base import DecoderTask
from tiny_decoder.tasks.checkpoint import TASKS, load_task

__all__ = ["TASKS", "DecoderTask", "load_task"]
