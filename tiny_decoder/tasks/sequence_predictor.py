"""The 256-class next-number predictor (design card: ``shared/design/sequence-predictor.md``).

Trains on all prefixes with the distance-weighted cross-entropy, reports accuracy / distance / loss next
to random baselines, per phase and per family, and continues a few fixed sequences greedily with the KV
cache at every validation.
"""

from __future__ import annotations

from typing import Any

import torch

from tiny_decoder.core.checks import parse_integers
from tiny_decoder.model.generation import generate
from tiny_decoder.tasks.base import DecoderTask, EvaluationRequest, GenerationRequest, OptimizerFactory
from tiny_decoder.tasks.checkpoint import TASKS
from tiny_decoder.training.losses import DISTANCE_WEIGHTINGS, PREDICTIONS, distance_weighted_cross_entropy
from tiny_decoder.training.metrics import SequenceMetrics
from tiny_decoder.training.schedulers import SchedulerFactory

# One of each phase's kinds of rule, long enough (7 numbers) that the rule is determined.
DEFAULT_PROMPTS = (
    [1, 2, 4, 7, 11, 16, 22],  # growing steps
    [3, 6, 12, 24, 48, 96, 192],  # geometric
    [9, 4, 9, 4, 9, 4, 9],  # alternating
    [5, 5, 6, 6, 7, 7, 8],  # two-step
    [200, 100, 150, 75, 112, 56, 84],  # rational factors (x1/2, x3/2)
    [1, 1, 2, 0, 2, 2, 1],  # fibonacci mod 3
)


@TASKS.register("sequence")
class SequencePredictor(DecoderTask):
    """Next-number prediction over integers 0..255 with the distance-weighted loss."""

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        alpha: float = 0.1,
        weighting: str = "linear",
        prediction: str = "argmax",
        family_names: list[str] | None = None,
        sample_prompts: list[list[int]] | None = None,
        sample_steps: int = 5,
    ):
        super().__init__(model, optimizer, scheduler)
        DISTANCE_WEIGHTINGS.get(weighting)
        PREDICTIONS.get(prediction)
        if alpha < 0:
            raise ValueError(f"task.alpha must be >= 0, got {alpha}")
        if family_names is None:
            from tiny_decoder.data.sequence_families import FAMILY_NAMES

            family_names = list(FAMILY_NAMES)
        self.val_metrics = SequenceMetrics(family_names, num_classes=self.model_config.vocab_size)
        self.test_metrics = SequenceMetrics(family_names, num_classes=self.model_config.vocab_size)
        self.sample_prompts = [list(p) for p in (sample_prompts or DEFAULT_PROMPTS)]

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        return distance_weighted_cross_entropy(logits, target, hp["alpha"], hp["weighting"], hp["prediction"])

    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: SequenceMetrics) -> None:
        logits = self.logits(batch["input"])
        metrics.update(logits, batch, self.loss(logits, batch["target"]))

    def _log_metrics(self, metrics: SequenceMetrics, prefix: str) -> None:
        values = metrics.compute(prefix)
        self.log(f"{prefix}/acc_last", values.pop(f"{prefix}/acc_last"), prog_bar=True)
        self.log_dict(values)
        metrics.reset()

    @torch.no_grad()
    def continue_sequence(
        self, numbers: list[int], steps: int, compile: bool | str = False, weights: str = "model"
    ) -> list[int]:
        """Greedy cached continuation of ``numbers`` by ``steps`` more numbers (``compile``: compiled decoding,
        ``weights``: the fast step's weight format)."""
        prompt = torch.tensor([numbers], dtype=torch.long, device=self.device)
        return generate(self.model, prompt, steps, compile=compile, weights=weights)[0, len(numbers) :].tolist()

    def generate_outputs(self, request: GenerationRequest) -> list[str]:
        """``generate sequence="1 2 4 7 11" steps=5``: the sequence followed by its continuation."""
        if not request.sequence:
            raise ValueError(
                'the sequence task needs sequence="<numbers separated by spaces>", e.g. sequence="1 2 4 7"'
            )
        numbers = parse_numbers(request.sequence, self.model_config.vocab_size - 1)
        continuation = self.continue_sequence(numbers, request.steps, compile=request.compile, weights=request.weights)
        return [" ".join(map(str, numbers)) + " -> " + " ".join(map(str, continuation))]

    @torch.no_grad()
    def evaluate_outputs(self, request: EvaluationRequest) -> dict[str, float]:
        """``evaluate n=3000 seed=S``: loss, accuracy, acc_last, mad and per-phase acc_last on ``n`` fresh
        phase-balanced sequences drawn from ``seed`` (the test metrics, without baselines and families)."""
        from lightning.fabric.utilities import move_data_to_device

        from tiny_decoder.data.sequences import SequenceDataModule

        data = SequenceDataModule(
            seq_len=self.model_config.context_length,
            batch_size=request.batch_size,
            val_samples=1,
            test_samples=request.n,
            test_seed=request.seed,
            max_value=self.model_config.vocab_size - 1,
        )
        self.test_metrics.reset()
        for batch in data.test_dataloader():
            self._evaluate(move_data_to_device(batch, self.device), self.test_metrics)
        values = self.test_metrics.compute("test")
        self.test_metrics.reset()
        return {name: float(value) for name, value in values.items() if name.startswith("test/")}

    def sample_texts(self) -> list[tuple[str, str]]:
        return [
            (" ".join(map(str, p)), " ".join(map(str, self.continue_sequence(p, self.hparams["sample_steps"]))))
            for p in self.sample_prompts
        ]


def parse_numbers(text: str, max_value: int) -> list[int]:
    """``"1 2 4"`` or ``"1,2,4"`` -> ``[1, 2, 4]``, each checked to lie in ``[0, max_value]``."""
    numbers = parse_integers("sequence", text)
    if not numbers or any(not 0 <= n <= max_value for n in numbers):
        raise ValueError(f"sequence={text!r}: needs at least one number, each in [0, {max_value}]")
    return numbers
