"""``python -m tiny_decoder.harness --model_args ckpt=PATH --tasks lambada_shared [lm_eval options]``: a trained
checkpoint on lm-evaluation-harness tasks, through lm_eval's own command line.

lm_eval's command line finds models only in its own table (``lm_eval.models.MODEL_MAPPING``; no entry points
or plugins), so ``lm_eval --model tiny_decoder`` cannot work from another package: this module registers the
model ``tiny_decoder`` (``model_args``: ``ckpt=PATH`` and optionally ``batch_size=N``, ``device=cpu``,
``max_gen_toks=N``) and then runs lm_eval's command line with the arguments as given, adding ``--model
tiny_decoder`` and ``--include_path`` (this package's tasks, e.g. ``lambada_shared``) unless they are given.

From Python: ``checkpoint_lm(ckpt)`` is an lm_eval ``LM`` for ``lm_eval.simple_evaluate(model=...)``, or call
:func:`register` and pass ``model="tiny_decoder", model_args="ckpt=PATH"``. ``harness_results`` serves
``python -m tiny_decoder.evaluate ckpt=PATH harness_tasks=[...]``. The adapter itself (plain model and
tokenizer, no checkpoint) is ``tiny_decoder.interop.harness``. Needs the ``eval`` extra.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

from tiny_decoder.cli import run_cli
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.interop import harness
from tiny_decoder.tasks import load_task
from tiny_decoder.tasks.language_model import LanguageModel

log = logging.getLogger(__name__)

MODEL_NAME = "tiny_decoder"


def model_parts(task: Any) -> tuple[Any, Any, int, bool]:
    """A loaded language-model task -> its model, tokenizer, end-of-text id and ``prepend_eot``."""
    if not isinstance(task, LanguageModel):
        raise ConfigError(
            f"lm-evaluation-harness tasks need a language-model checkpoint; this one is a {task.task_name!r} task"
        )
    return task.model, task.tokenizer, task.eot_id, bool(task.hparams.get("prepend_eot"))


def run_device(device: str | None) -> str:
    """Where to run: ``device``, or cpu when it is unset or a GPU that is not there (lm_eval's ``--device``
    defaults to ``cuda:0``)."""
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        log.info("device=%s: no GPU here; running on the cpu", device)
        return "cpu"
    return device or "cpu"


def task_lm(task: Any, batch_size: int | str | None = harness.DEFAULT_BATCH_SIZE, **options: Any) -> Any:
    """The lm_eval ``LM`` of a loaded language-model task."""
    harness.require_lm_eval()
    return harness.harness_lm(*model_parts(task), batch_size=batch_size, **options)


def checkpoint_lm(ckpt: str, **model_args: Any) -> Any:
    """The lm_eval ``LM`` of the language-model checkpoint ``ckpt`` (``model_args``: ``batch_size``, ``device``,
    ``max_gen_toks``), the model lm_eval's command line builds for ``--model tiny_decoder``."""
    return register()(ckpt, **model_args)


def harness_results(lm: Any, tasks: Sequence[str], limit: int | None = None, lambada: str | None = None) -> dict:
    """``task/metric`` values of lm_eval's ``tasks`` on ``lm`` (:func:`task_lm`, :func:`checkpoint_lm`);
    ``lambada``: the file of ``lambada_shared``."""
    return harness.evaluate_tasks(lm, tasks, limit, {"lambada": str(lambada)} if lambada else None)


@functools.cache
def register() -> type:
    """Register the model ``tiny_decoder`` with lm_eval (once); returns its class."""
    harness.require_lm_eval()
    import lm_eval.models  # noqa: F401  (its built-in models: registered when imported, after ours otherwise not)
    from lm_eval.api.registry import register_model
    from lm_eval.utils import simple_parse_args_string

    class CheckpointLM(harness.harness_lm_class()):  # type: ignore[misc]
        """``model_args``: ``ckpt=PATH`` [``batch_size=N``, ``device=cpu``, ``max_gen_toks=N``]; these win over
        lm_eval's ``--batch_size`` / ``--device`` (which it always passes, with defaults 1 and cuda:0)."""

        def __init__(
            self,
            ckpt: str,
            batch_size: int | str | None = harness.DEFAULT_BATCH_SIZE,
            device: str | None = None,
            max_gen_toks: int = harness.DEFAULT_MAX_GEN_TOKS,
            max_batch_size: int | None = None,  # lm_eval passes it for --batch_size auto; unused
        ):
            device = run_device(device)
            task = load_task(str(ckpt), map_location=device).to(device)
            super().__init__(*model_parts(task), batch_size, max_gen_toks)

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> Any:
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
            return cls(**arg_dict, **extra)

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Any:
            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    register_model(MODEL_NAME)(CheckpointLM)
    return CheckpointLM


def lm_eval_arguments(args: Sequence[str]) -> list[str]:
    """The command line for lm_eval: ``args``, plus ``--model tiny_decoder`` and this package's task folder when a
    run does not name them; for this model also ``--batch_size`` (lm_eval's default of 1 row per forward pass is
    this adapter's slowest) and ``--device`` (the GPU when there is one, else the cpu; lm_eval's default is cuda:0)
    unless given."""
    args = list(args)
    if args and args[0] in ("ls", "validate"):
        return args if "--include_path" in args else [*args, "--include_path", str(harness.TASKS_DIR)]
    given = {arg.split("=", 1)[0] for arg in args}
    if not {"--model", "-M"} & given:
        args += ["--model", MODEL_NAME]
    if "--include_path" not in given:
        args += ["--include_path", str(harness.TASKS_DIR)]
    if model_name(args) == MODEL_NAME:
        if not {"--batch_size", "-b"} & given:
            args += ["--batch_size", str(harness.DEFAULT_BATCH_SIZE)]
        if "--device" not in given:
            args += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    return args


def model_name(args: list[str]) -> str | None:
    """The value of ``--model`` / ``-M`` in ``args`` (``--model X`` or ``--model=X``)."""
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if name in ("--model", "-M"):
            return value if equals else (args[i + 1] if i + 1 < len(args) else None)
    return None


def run_lm_eval(args: Sequence[str]) -> None:
    """lm_eval's own command line on ``args`` (:func:`lm_eval_arguments`), with ``tiny_decoder`` registered."""
    register()
    harness.quiet_own_task_notices()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *lm_eval_arguments(args)]
    cli_evaluate()


def main() -> None:
    """``python -m tiny_decoder.harness ARGS``: lm_eval's command line; a user error is one ``error:`` line."""
    run_cli(run_lm_eval, sys.argv[1:])


if __name__ == "__main__":
    main()
