"""The next-token language model (TinyStories, Tiny Shakespeare, any text).

Trains with next-token cross-entropy and reports loss, perplexity and bits per byte per split. The
tokenizer the model was trained with is stored in the checkpoint (its JSON and fingerprint as
hyper-parameters, taken from the data module when training starts), so ``generate`` and ``evaluate``
need the checkpoint alone, and data tokenized differently is refused. Also here: story samples at each
validation, ``generate_outputs`` and ``evaluate_outputs`` (loss / perplexity / bits per byte on text files, and
LAMBADA last-word accuracy).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities import move_data_to_device
from tokenizers import Tokenizer
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics import MeanMetric

from tiny_decoder.core.progress import track
from tiny_decoder.data import tokenizer as tokenizer_lib
from tiny_decoder.model.generation import generate
from tiny_decoder.tasks.base import DecoderTask, EvaluationRequest, GenerationRequest, OptimizerFactory
from tiny_decoder.tasks.checkpoint import TASKS
from tiny_decoder.training.losses import next_token_cross_entropy
from tiny_decoder.training.metrics import bits_per_byte
from tiny_decoder.training.schedulers import SchedulerFactory

DEFAULT_PROMPTS = ("Once upon a time", "One day, a little girl named Lily", "The cat")
# metric prefix -> data module split, and back
SPLIT_OF_PREFIX = {"train": "train", "val": "validation", "test": "test"}
PREFIX_OF_SPLIT = {split: prefix for prefix, split in SPLIT_OF_PREFIX.items()}
IGNORE_INDEX = -100


class LanguageModelMetrics(nn.Module):
    """Token-weighted mean loss of one split -> ``loss``, ``ppl`` and (given bytes per token) ``bpb``."""

    def __init__(self):
        super().__init__()
        self.loss = MeanMetric()

    def update(self, loss: torch.Tensor, n_tokens: int) -> None:
        self.loss.update(loss.detach(), weight=n_tokens)

    def compute(self, prefix: str, bytes_per_token: float | None = None) -> dict[str, torch.Tensor]:
        loss = self.loss.compute()
        values = {f"{prefix}/loss": loss, f"{prefix}/ppl": loss.exp()}
        if bytes_per_token:
            values[f"{prefix}/bpb"] = bits_per_byte(loss, bytes_per_token)
        return values

    def reset(self) -> None:
        self.loss.reset()


@TASKS.register("lm")
class LanguageModel(DecoderTask):
    """Next-token prediction over a BPE vocabulary; the tokenizer travels in the checkpoint."""

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        tokenizer_json: str | None = None,
        tokenizer_fingerprint: str | None = None,
        bytes_per_token: dict[str, float] | None = None,
        prepend_eot: bool | None = None,
        eot_token: str = tokenizer_lib.DEFAULT_EOT,
        start_token: str | None = None,
        sample_prompts: Sequence[str] | None = None,
        sample_max_new_tokens: int = 100,
        sample_temperature: float = 0.8,
        sample_top_k: int | None = 50,
        sample_seed: int = 0,
    ):
        super().__init__(model, optimizer, scheduler)
        self.val_metrics = LanguageModelMetrics()
        self.test_metrics = LanguageModelMetrics()
        self.sample_prompts = list(sample_prompts or DEFAULT_PROMPTS)
        self._tokenizer: Tokenizer | None = None
        if tokenizer_json is not None:
            self.use_tokenizer(Tokenizer.from_str(tokenizer_json))

    # ---------------------------------------------------------------- tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise ValueError(
                "this language model has no tokenizer: it is recorded from the data module when training "
                "starts (or call task.use_tokenizer(tokenizer))"
            )
        return self._tokenizer

    @property
    def eot_id(self) -> int:
        """The token that ends a text (``eot_token``: ``<|endoftext|>``; an imported model's own, e.g. ``<s>``)."""
        return tokenizer_lib.eot_id(self.tokenizer, self.hparams.get("eot_token", tokenizer_lib.DEFAULT_EOT))

    @property
    def start_id(self) -> int:
        """The token a prompt starts with under ``prepend_eot``: ``start_token`` when set (an imported Llama's
        BOS), else the end-of-text token (every story starts after one)."""
        start_token = self.hparams.get("start_token")
        return self.eot_id if start_token is None else tokenizer_lib.eot_id(self.tokenizer, start_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone (no special tokens a tokenizer's post-processor would add)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def use_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Adopt ``tokenizer``; its JSON and fingerprint become hyper-parameters (so the checkpoint has them)."""
        fingerprint = tokenizer_lib.tokenizer_fingerprint(tokenizer)
        self.check_tokenizer(fingerprint, "the given tokenizer")
        if tokenizer.get_vocab_size() > self.model_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size is "
                f"{self.model_config.vocab_size}: leave model.vocab_size null to take it from the data"
            )
        self.hparams.update(tokenizer_json=tokenizer.to_str(), tokenizer_fingerprint=fingerprint)
        self._tokenizer = tokenizer

    def check_tokenizer(self, fingerprint: str | None, source: str = "the data") -> None:
        """Refuse a tokenizer other than the one this model was trained with."""
        recorded = self.hparams.get("tokenizer_fingerprint")
        if recorded and fingerprint != recorded:
            raise ValueError(
                f"tokenizer mismatch: the model was trained with tokenizer {recorded}, but {source} uses tokenizer "
                f"{fingerprint}. Use the model's own tokenizer (with tiny_decoder.evaluate leave data.tokenizer_path "
                "unset: the tokenizer stored in the checkpoint is used), or retrain on this tokenizer."
            )

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of ``text``, after the start token when ``prepend_eot`` (every story starts after one)."""
        start = [self.start_id] if self.hparams["prepend_eot"] else []
        return start + self.encode(text)

    def decode_continuation(self, ids: list[int]) -> str:
        """Text of generated ids up to (not including) the first ``<|endoftext|>``."""
        eot = self.eot_id
        return self.tokenizer.decode(ids[: ids.index(eot)] if eot in ids else ids)

    # ---------------------------------------------------------------- data hooks

    def setup(self, stage: str) -> None:
        """Take the tokenizer and bytes per token from the trainer's data module, when it has them."""
        self.attach_data(getattr(self.trainer, "datamodule", None))  # set by Lightning, not declared on Trainer

    def attach_data(self, datamodule: Any) -> None:
        """Record the data's tokenizer and bytes per token (and, unless set, whether prompts start with EOT)."""
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            self.use_tokenizer(tokenizer)
        if self.hparams["prepend_eot"] is None:
            self.hparams["prepend_eot"] = bool(getattr(getattr(datamodule, "format", None), "append_eot", False))
        bytes_per_token = getattr(datamodule, "bytes_per_token", None)
        if bytes_per_token:
            self.hparams["bytes_per_token"] = {split: float(value) for split, value in bytes_per_token.items()}

    def bytes_per_token(self, prefix: str) -> float | None:
        return (self.hparams.get("bytes_per_token") or {}).get(SPLIT_OF_PREFIX[prefix])

    # ---------------------------------------------------------------- training and evaluation steps

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return next_token_cross_entropy(logits, target)

    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: LanguageModelMetrics) -> None:
        loss = self.loss(self.logits(batch["input"]), batch["target"])
        metrics.update(loss, batch["target"].numel())

    def _log_metrics(self, metrics: LanguageModelMetrics, prefix: str) -> None:
        self.log_dict(metrics.compute(prefix, self.bytes_per_token(prefix)), prog_bar=True)
        metrics.reset()

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def continue_text(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        compile: bool | str = False,
        weights: str = "model",
    ) -> list[str]:
        """``num_samples`` continuations of ``prompt`` (cached decoding, stopping at ``<|endoftext|>``;
        ``compile``: the compiled decoding step of :func:`tiny_decoder.model.generation.generate` (true, false or
        auto); ``weights``: the fast step's weight format there)."""
        ids = self.encode_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give prompt=TEXT (this model does not start from <|endoftext|>)")
        batch = torch.tensor([ids] * num_samples, dtype=torch.long, device=self.device)
        tokens = generate(
            self.model,
            batch,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            self.eot_id,
            generator,
            compile=compile,
            weights=weights,
        )
        return [self.decode_continuation(row) for row in tokens[:, len(ids) :].tolist()]

    def sample_texts(self) -> list[tuple[str, str]]:
        """A seeded continuation of each sample prompt (temperature / top-k from the task config)."""
        if self._tokenizer is None:
            return []
        hp = self.hparams
        generator = torch.Generator(device=self.device).manual_seed(hp["sample_seed"])
        options = {"temperature": hp["sample_temperature"], "top_k": hp["sample_top_k"], "generator": generator}
        return [(p, self.continue_text(p, hp["sample_max_new_tokens"], **options)[0]) for p in self.sample_prompts]

    def generate_outputs(self, request: GenerationRequest) -> list[str]:
        """``generate prompt="Once upon a time" temperature=0.8 top_k=50 num_samples=3 [compile=true]``: prompt +
        continuation."""
        prompt = request.prompt or ""
        texts = self.continue_text(
            prompt,
            request.max_new_tokens,
            request.temperature,
            request.top_k,
            request.top_p,
            request.num_samples,
            compile=request.compile,
            weights=request.weights,
        )
        return [prompt + text for text in texts]

    # ---------------------------------------------------------------- evaluation from a checkpoint

    def evaluate_outputs(self, request: EvaluationRequest) -> dict[str, float]:
        """Loss / perplexity / bits per byte on each split of the text data; LAMBADA when ``request.lambada``."""
        results: dict[str, float] = {}
        if request.text_data is not None:
            datamodule = self.text_datamodule(request.text_data, request.tokenizer_path)
            results.update(self.evaluate_text(datamodule, request.batch_size, request.max_blocks))
        if request.lambada:
            results.update(self.evaluate_lambada(request.lambada, request.lambada_limit, request.batch_size))
        if not results:
            raise ValueError("nothing to evaluate: give data.files.validation=PATH (or .test) and/or lambada=PATH")
        return results

    def text_datamodule(self, build: Callable[..., Any], tokenizer_path: str | None = None) -> Any:
        """``build(context_length=..., tokenizer_json=...)``: a text data module with this model's context length
        and tokenizer (or the one at ``tokenizer_path``, refused here unless it is the model's)."""
        tokenizer = self.tokenizer
        if tokenizer_path:
            path = Path(tokenizer_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"data.tokenizer_path: no such file {path}")
            tokenizer = Tokenizer.from_file(str(path))
            self.check_tokenizer(
                tokenizer_lib.tokenizer_fingerprint(tokenizer), f"data.tokenizer_path={tokenizer_path}"
            )
        return build(
            context_length=self.model_config.context_length, tokenizer_json=tokenizer.to_str(), tokenizer_path=None
        )

    @torch.no_grad()
    def evaluate_text(self, datamodule: Any, batch_size: int = 32, max_blocks: int | None = None) -> dict[str, float]:
        """Metrics on every split the (text) data module holds; refuses data of another tokenizer."""
        datamodule.setup("test")
        self.check_tokenizer(datamodule.tokenizer_fingerprint, "the evaluation data")
        results: dict[str, float] = {}
        for split, blocks in datamodule.datasets.items():
            prefix = PREFIX_OF_SPLIT[split]
            bytes_per_token = datamodule.bytes_per_token[split]
            results.update(self.evaluate_blocks(blocks, prefix, bytes_per_token, batch_size, max_blocks))
        return results

    @torch.no_grad()
    def evaluate_blocks(
        self,
        blocks: Dataset,
        prefix: str,
        bytes_per_token: float | None = None,
        batch_size: int = 32,
        max_blocks: int | None = None,
    ) -> dict[str, float]:
        """Mean loss, perplexity and bits per byte over (the first ``max_blocks``) ``{"input", "target"}`` blocks."""
        assert isinstance(blocks, Sized), "evaluate_blocks needs a map-style dataset (with a length)"
        n_blocks = len(blocks) if max_blocks is None else min(len(blocks), int(max_blocks))
        metrics = LanguageModelMetrics().to(self.device)
        batches = DataLoader(Subset(blocks, range(n_blocks)), batch_size=batch_size)
        for batch in track(batches, n_blocks, prefix.rstrip("/"), "blocks", size=lambda b: len(b["input"])):
            self._evaluate(move_data_to_device(batch, self.device), metrics)
        return {name: float(value) for name, value in metrics.compute(prefix, bytes_per_token).items()}

    @torch.no_grad()
    def evaluate_lambada(self, path: str | Path, limit: int | None = None, batch_size: int = 32) -> dict[str, float]:
        """LAMBADA (OpenAI's jsonl): last-word accuracy and loss over the first ``limit`` passages.

        ``acc``: greedy decoding reproduces every token of the target word (one teacher-forced pass: the
        argmax at each target position is the target token). ``loss``: mean NLL per target token.
        ``word_ppl``: ``exp`` of the mean per-passage NLL of the whole word (lm-evaluation-harness's perplexity).
        """
        passages = read_lambada(path, limit)
        if not passages:
            raise ValueError(f"lambada={path}: no passages")
        pairs = [(self.encode_prompt(context), self.encode(" " + target)) for context, target in passages]
        batches = (pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size))
        scores = [self.score_continuations(batch) for batch in track(batches, len(pairs), "LAMBADA", "passages", len)]
        nll, correct, n_tokens = (torch.cat(parts) for parts in zip(*scores, strict=True))
        return {
            "lambada/acc": correct.float().mean().item(),
            "lambada/loss": (nll.sum() / n_tokens.sum()).item(),
            "lambada/word_ppl": math.exp(nll.mean().item()),
            "lambada/passages": float(len(passages)),
        }

    def score_continuations(
        self, pairs: Sequence[tuple[list[int], list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each ``(context ids, target ids)``: the target's summed NLL, whether the argmax gets every target
        token right, and the target's token count. Long contexts are left-truncated to the model's context."""
        inputs, targets = pack_continuations(pairs, self.model_config.context_length)
        logits = self(inputs.to(self.device)).float()
        targets = targets.to(self.device)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        scored = targets != IGNORE_INDEX
        correct = ((logits.argmax(dim=-1) == targets) | ~scored).all(dim=1)
        return nll.sum(dim=1).cpu(), correct.cpu(), scored.sum(dim=1).cpu()


def read_lambada(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """``(context, target)`` pairs from a LAMBADA jsonl (``{"text": ...}`` per line); the target is the last
    whitespace-separated word and the context everything before it."""

    def texts() -> Iterator[str]:
        with Path(path).open(encoding="utf-8") as lines:
            yield from (json.loads(line)["text"] for line in lines if line.strip())

    pairs = []
    for text in itertools.islice(texts(), None if limit is None else int(limit)):
        words = text.rsplit(maxsplit=1)
        if len(words) != 2:
            raise ValueError(f"lambada={path}: passage without a context before its last word: {text!r}")
        pairs.append((words[0], words[1]))
    return pairs


def pack_continuations(
    pairs: Sequence[tuple[list[int], list[int]]], context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(B, T)`` inputs and targets for scoring each target given its context: targets are
    ``IGNORE_INDEX`` except at the target tokens; each row keeps its last ``context_length + 1`` tokens."""
    rows = []
    for context, target in pairs:
        if not context or len(target) > context_length:
            raise ValueError(f"cannot score {len(target)} target tokens after {len(context)} context tokens")
        rows.append(((context + target)[-(context_length + 1) :], len(target)))
    width = max(len(row) for row, _ in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, n_target) in enumerate(rows):
        n_inputs = len(row) - 1
        inputs[i, :n_inputs] = torch.tensor(row[:-1])
        targets[i, n_inputs - n_target : n_inputs] = torch.tensor(row[-n_target:])
    return inputs, targets
