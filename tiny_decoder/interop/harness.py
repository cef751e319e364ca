"""lm-evaluation-harness over the project's plain model: a ``DecoderTransformer``, its ``tokenizers.Tokenizer``
and end-of-text id become an lm_eval ``LM`` (loglikelihood, rolling loglikelihood, generate_until, batched).

Here: the token-level work in plain torch (:func:`score_pairs`: a continuation's log-probability and whether
greedy decoding reproduces it, as lm_eval's Hugging Face model computes them, left-truncating to the model's
context; :func:`generate_continuations`: KV-cached decoding of prompts of one length together), the ``LM``
class over them (:func:`harness_lm`), :func:`evaluate_tasks` (tasks by name -> flat ``task/metric`` values)
and the offline tasks in ``harness_tasks/`` (``lambada_shared``: lm_eval's ``lambada_openai`` over a local
jsonl, read by :func:`lambada_dataset`). Loading a checkpoint and the ``tiny_decoder`` model name of lm_eval's
command line are the tool ``tiny_decoder.harness``.

lm_eval is optional (the ``eval`` extra) and imported only inside the functions that need it; without it they
raise one ``ConfigError`` line saying how to install it.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model.generation import generate
from tiny_decoder.model.transformer import DecoderTransformer

INSTALL_HINT = 'lm-evaluation-harness is not installed: pip install -e ".[eval]" (the eval extra)'
TASKS_DIR = Path(__file__).with_name("harness_tasks")  # lm_eval's include_path for this package's tasks
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's Hugging Face model's default

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


def require_lm_eval() -> None:
    """Raise one clear line when lm_eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise ConfigError(INSTALL_HINT) from error


# ----------------------------------------------------------------------------- scoring


def model_device(model: DecoderTransformer) -> torch.device:
    return next(model.parameters()).device


def scoring_row(context: list[int], continuation: list[int], context_length: int) -> list[int]:
    """The model input that scores ``continuation`` after ``context``: the joined ids without the last one, left-
    truncated to ``context_length`` (lm_eval's ``(context + continuation)[-(max_length + 1):][:-1]``)."""
    if not context or not continuation:
        raise ValueError(f"cannot score {len(continuation)} continuation tokens after {len(context)} context tokens")
    if len(continuation) > context_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the context of {context_length}")
    return (context + continuation)[-(context_length + 1) : -1]


def continuation_score(logprobs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """``(n, V)`` log-probabilities at the positions that predict the ``n`` continuation tokens -> their summed
    log-probability and whether the argmax is each of them."""
    target = torch.tensor(continuation)
    logprob = logprobs.gather(1, target[:, None]).sum().item()
    return logprob, bool((logprobs.argmax(dim=-1) == target).all())


@torch.no_grad()
def score_batch(model: DecoderTransformer, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
    """:func:`continuation_score` of each pair, in one right-padded forward pass."""
    rows = [scoring_row(context, continuation, model.config.context_length) for context, continuation in pairs]
    inputs = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        inputs[i, : len(row)] = torch.tensor(row)
    logprobs = model(inputs.to(model_device(model))).float().log_softmax(dim=-1).cpu()
    return [
        continuation_score(logprobs[i, len(row) - len(continuation) : len(row)], continuation)
        for i, (row, (_, continuation)) in enumerate(zip(rows, pairs, strict=True))
    ]


def score_pairs(
    model: DecoderTransformer, pairs: Sequence[Pair], batch_size: int = DEFAULT_BATCH_SIZE
) -> list[tuple[float, bool]]:
    """``(log-probability, is_greedy)`` of each ``(context ids, continuation ids)``, in the order given; scored
    longest first, ``batch_size`` at a time (rows of similar length: little padding). A continuation longer than
    the model's context is scored in consecutive pieces (:func:`context_pieces`), their log-probabilities summed."""
    pieces = [context_pieces(pair, model.config.context_length) for pair in pairs]
    flat = [piece for owned in pieces for piece in owned]
    order = sorted(range(len(flat)), key=lambda i: len(flat[i][0]) + len(flat[i][1]), reverse=True)
    scores: dict[int, tuple[float, bool]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        scores.update(zip(chunk, score_batch(model, [flat[i] for i in chunk]), strict=True))
    scored = iter(scores[i] for i in range(len(flat)))
    results = []
    for owned in pieces:
        parts = list(itertools.islice(scored, len(owned)))
        results.append((sum(logprob for logprob, _ in parts), all(greedy for _, greedy in parts)))
    return results


def context_pieces(pair: Pair, context_length: int) -> list[Pair]:
    """``pair`` as pieces whose continuations fit the context: each piece's continuation is the next at most
    ``context_length`` tokens, its context everything before them (left-truncated when scored)."""
    context, continuation = pair
    return [
        (context + continuation[:start], continuation[start : start + context_length])
        for start in range(0, len(continuation), context_length)
    ] or [pair]


def rolling_pairs(tokens: list[int], prefix_id: int, context_length: int) -> list[Pair]:
    """lm_eval's rolling windows over ``tokens`` (each token predicted once, the first after ``prefix_id``), as
    disjoint ``(context, continuation)`` pairs for :func:`score_pairs`."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = get_rolling_token_windows(
        token_list=tokens, prefix_token=prefix_id, max_seq_len=context_length, context_len=1
    )
    return [make_disjoint_window(window) for window in windows]


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_continuations(
    model: DecoderTransformer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    eot_id: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **sampling: Any,
) -> list[list[int]]:
    """The new ids after each prompt (:func:`~tiny_decoder.model.generation.generate`, stopping at ``eot_id``);
    prompts of one length are decoded together, ``batch_size`` at a time. ``sampling``: temperature / top_k /
    top_p (none: greedy)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    outputs: dict[int, list[int]] = {}
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=model_device(model))
            tokens = generate(model, batch, max_new_tokens, eos_id=eot_id, **sampling)
            outputs.update(zip(chunk, tokens[:, batch.shape[1] :].tolist(), strict=True))
    return [outputs[i] for i in range(len(prompts))]


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def generation_options(gen_kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
    """lm_eval's generation kwargs -> (stop strings, max new tokens, sampling options of ``generate``); greedy
    unless ``do_sample`` (then ``temperature``, default 1, ``top_k``, ``top_p``)."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new_tokens = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    sampling: dict[str, Any] = {}
    if gen_kwargs.get("do_sample"):
        sampling = {key: gen_kwargs.get(key) for key in ("top_k", "top_p")}
        sampling["temperature"] = float(gen_kwargs.get("temperature", 1.0))
    return until, max_new_tokens, sampling


# ----------------------------------------------------------------------------- the lm_eval model


@functools.cache
def harness_lm_class() -> type:
    """lm_eval's ``TemplateLM`` over a plain model and tokenizer (built on first use: lm_eval is optional)."""
    require_lm_eval()
    from lm_eval.api.model import TemplateLM

    class DecoderLM(TemplateLM):
        """A ``DecoderTransformer`` for lm_eval. Texts are encoded after ``<|endoftext|>`` when the model was
        trained so (``prepend_eot``, as ``LanguageModel.encode_prompt``); an empty context and the rolling
        windows start from it in any case (lm_eval's prefix token)."""

        def __init__(
            self,
            model: DecoderTransformer,
            tokenizer: Tokenizer,
            eot_id: int,
            prepend_eot: bool,
            batch_size: int | str | None = DEFAULT_BATCH_SIZE,
            max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        ):
            super().__init__()
            self.model = model.eval()
            self.tokenizer = tokenizer
            self.eot_id = eot_id
            self.prepend_eot = prepend_eot
            self.batch_size = harness_batch_size(batch_size)
            self.max_gen_toks = int(max_gen_toks)

        @property
        def eot_token_id(self) -> int:
            return self.eot_id

        @property
        def max_length(self) -> int:
            return self.model.config.context_length

        @property
        def device(self) -> torch.device:
            return model_device(self.model)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            start = [self.eot_id] if self.prepend_eot and add_special_tokens is not False else []
            return start + self.tokenizer.encode(string).ids

        def tok_decode(self, ids: list[int]) -> str:
            return self.tokenizer.decode(ids)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
            scores = score_pairs(self.model, [(context, cont) for _, context, cont in requests], self.batch_size)
            for (key, _, _), score in zip(requests, scores, strict=True):
                self.cache_hook.add_partial("loglikelihood", key, score)
            return scores

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            texts = [request.args[0] for request in requests]
            windows = [
                rolling_pairs(self.tok_encode(text, add_special_tokens=False), self.eot_id, self.max_length)
                for text in texts
            ]
            scores = iter(score_pairs(self.model, [pair for pairs in windows for pair in pairs], self.batch_size))
            totals = [sum(logprob for logprob, _ in itertools.islice(scores, len(pairs))) for pairs in windows]
            for text, total in zip(texts, totals, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            return totals

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            groups: dict[str, list[int]] = defaultdict(list)  # requests of the same generation kwargs
            for i, request in enumerate(requests):
                groups[repr(sorted(request.args[1].items()))].append(i)
            outputs: dict[int, str] = {}
            for indices in groups.values():
                outputs.update(zip(indices, self.generate_group([requests[i].args for i in indices]), strict=True))
            return [outputs[i] for i in range(len(requests))]

        def generate_group(self, args: list[tuple[str, dict[str, Any]]]) -> list[str]:
            until, max_new_tokens, sampling = generation_options({"max_gen_toks": self.max_gen_toks, **args[0][1]})
            prompts = [self.tok_encode(context) or [self.eot_id] for context, _ in args]
            generated = generate_continuations(
                self.model, prompts, max_new_tokens, self.eot_id, self.batch_size, **sampling
            )
            texts = [cut_at_stops(self.tok_decode(until_eot(ids, self.eot_id)), until) for ids in generated]
            for (context, gen_kwargs), text in zip(args, texts, strict=True):
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return texts

    return DecoderLM


def until_eot(ids: list[int], eot_id: int) -> list[int]:
    return ids[: ids.index(eot_id)] if eot_id in ids else ids


def harness_batch_size(batch_size: int | str | None) -> int:
    """lm_eval's ``batch_size`` (an int, its text, ``auto`` or None) -> the rows per forward pass."""
    if batch_size is None or str(batch_size).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    if not str(batch_size).isdigit() or int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size}: give a positive number of rows per forward pass")
    return int(batch_size)


def harness_lm(model: DecoderTransformer, tokenizer: Tokenizer, eot_id: int, prepend_eot: bool, **options: Any) -> Any:
    """An lm_eval ``LM`` over ``model`` (``options``: ``batch_size``, ``max_gen_toks``): pass it as
    ``lm_eval.simple_evaluate(model=...)`` or to :func:`evaluate_tasks`."""
    return harness_lm_class()(model, tokenizer, eot_id, prepend_eot, **options)


# ----------------------------------------------------------------------------- tasks


def evaluate_tasks(
    lm: Any,
    tasks: Sequence[str],
    limit: int | None = None,
    metadata: dict[str, Any] | None = None,
    bootstrap_iters: int = 0,
) -> dict[str, float]:
    """lm_eval's tasks by name (its own and this package's ``harness_tasks/``) on ``lm`` -> ``task/metric``
    values. ``limit``: the first N documents of each; ``metadata``: passed to the tasks (``lambada``: the
    LAMBADA file of ``lambada_shared``); ``bootstrap_iters`` > 0 adds the bootstrapped standard errors (lm_eval's
    default 100000 spawns a process pool and prints to stdout, so none by default)."""
    require_lm_eval()
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        task_manager=task_manager(tasks, metadata),
        bootstrap_iters=bootstrap_iters,
    )
    return flat_metrics(results)


class OwnTaskNotice(logging.Filter):
    """Drops lm_eval's warning that a task with a ``custom_dataset`` takes ``--metadata`` (printed for every such
    task, i.e. for each of this package's own, where the metadata is documented)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(tuple(f"{task}: Custom kwargs" for task in OWN_TASKS))


OWN_TASKS = tuple(path.stem for path in TASKS_DIR.glob("*.yaml"))


def quiet_own_task_notices() -> None:
    """Install :class:`OwnTaskNotice` on lm_eval's task logger (once)."""
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, OwnTaskNotice) for f in task_logger.filters):
        task_logger.addFilter(OwnTaskNotice())


def task_manager(tasks: Sequence[str], metadata: dict[str, Any] | None = None) -> Any:
    """lm_eval's ``TaskManager`` with this package's tasks; lm_eval's own (seconds to index) only when needed."""
    from lm_eval.tasks import TaskManager

    quiet_own_task_notices()

    own = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    if set(tasks) <= set(own.all_tasks):
        return own
    return TaskManager(include_path=str(TASKS_DIR), metadata=metadata)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """lm_eval's results -> ``{"task/metric": value}``, numbers only (a filter other than ``none`` becomes a
    suffix; ``sample_len``: the documents evaluated)."""
    flat: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"{task}/{name}" + ("" if filter_name in ("", "none") else f"_{filter_name}")] = float(value)
    return flat


def lambada_dataset(data_files: str, lambada: str | None = None, **metadata: Any) -> Any:
    """The ``custom_dataset`` of ``harness_tasks/lambada_shared.yaml``: the LAMBADA jsonl (``{"text": ...}`` a
    line) ``lambada`` (lm_eval's ``--metadata lambada=PATH``, evaluate's ``lambada=PATH``), else the task's
    ``data_files``, as the split ``test``."""
    import datasets

    path = Path(lambada or data_files).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"lambada_shared: no LAMBADA file {path} (give lambada=PATH)")
    return datasets.load_dataset("json", data_files={"test": str(path)})
