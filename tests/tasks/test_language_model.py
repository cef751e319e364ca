"""Tests for the LanguageModel task: metrics, a short fit on TinyStories, the tokenizer in the checkpoint,
generation from the checkpoint, refusal of another tokenizer, and text / LAMBADA evaluation."""

from __future__ import annotations

import json
import math
import os
import re
from functools import partial
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from torch import nn  # noqa: E402

from tests.data.text_helpers import DATA_DIR, STORIES_FILE, require, write_stories  # noqa: E402
from tiny_decoder.cli import typed_request  # noqa: E402
from tiny_decoder.data import tokenizer as tokenizer_lib  # noqa: E402
from tiny_decoder.data.text import EOT_TOKEN, TextDataModule  # noqa: E402
from tiny_decoder.evaluate import evaluation_request  # noqa: E402
from tiny_decoder.model import ModelConfig  # noqa: E402
from tiny_decoder.model.generation import generate  # noqa: E402
from tiny_decoder.tasks import load_task  # noqa: E402
from tiny_decoder.tasks.base import GenerationRequest  # noqa: E402
from tiny_decoder.tasks.language_model import (  # noqa: E402
    IGNORE_INDEX,
    LanguageModel,
    LanguageModelMetrics,
    pack_continuations,
    read_lambada,
)

LAMBADA_FILE = DATA_DIR / "lambada" / "lambada_test.jsonl"
VOCAB = 320
CONTEXT = 64
STEPS = 30


def make_dm(files: dict, cache_dir: Path, **overrides) -> TextDataModule:
    options = dict(vocab_size=VOCAB, context_length=CONTEXT, batch_size=16, cache_dir=str(cache_dir))
    return TextDataModule(files=files, **{**options, **overrides})


def make_task(vocab_size: int = VOCAB, **overrides) -> LanguageModel:
    model = ModelConfig(
        vocab_size=vocab_size,
        context_length=CONTEXT,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        bias=False,
        tie_embeddings=True,
        positional={"name": "rope"},
    ).to_dict()
    options = dict(optimizer=partial(torch.optim.AdamW, lr=3e-3), sample_max_new_tokens=20)
    return LanguageModel(model, **{**options, **overrides})


def quiet_trainer(**overrides) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**options, **overrides})


class ForceToken(nn.Module):
    """Wraps a head so that ``token`` always has the largest logit."""

    def __init__(self, head: nn.Module, token: int):
        super().__init__()
        self.head = head
        self.token = token

    @property
    def weight(self) -> torch.Tensor:  # the model's cache takes device and dtype from the head's weight
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).clone()
        logits[..., self.token] = logits.abs().max() + 100.0
        return logits


@pytest.fixture(scope="module")
def stories() -> list[str]:
    text = require(STORIES_FILE).read_text(encoding="utf-8")
    return [s.strip() for s in text.split(EOT_TOKEN)[:260] if s.strip()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm")


@pytest.fixture(scope="module")
def files(workdir, stories) -> dict[str, str]:
    return {
        "train": str(write_stories(workdir / "train.txt", stories[:160])),
        "validation": str(write_stories(workdir / "val.txt", stories[160:190])),
    }


@pytest.fixture(scope="module")
def trained(workdir, files):
    """A tiny LM fitted for STEPS steps on 160 stories, validated before and after, saved as a checkpoint."""
    torch.manual_seed(0)
    dm = make_dm(files, workdir / "cache")
    task = make_task()
    trainer = quiet_trainer(max_steps=STEPS)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]
    trainer.fit(task, datamodule=dm)
    after = trainer.validate(task, datamodule=dm, verbose=False)[0]
    checkpoint = workdir / "lm.ckpt"
    trainer.save_checkpoint(checkpoint)
    return SimpleNamespace(dm=dm, task=task, before=before, after=after, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def loaded(trained) -> LanguageModel:
    return load_task(str(trained.checkpoint))


@pytest.fixture(scope="module")
def other_tokenizer(workdir, stories) -> Path:
    """A tokenizer of the same size trained on other stories (so another fingerprint), saved as a file."""
    dm = make_dm({"train": str(write_stories(workdir / "other.txt", stories[190:]))}, workdir / "cache")
    dm.setup()
    path = workdir / "other_tokenizer.json"
    dm.tokenizer.save(str(path))
    return path


# ----------------------------------------------------------------------------- metrics


def test_metrics_weight_by_tokens_and_convert_to_bits_per_byte():
    metrics = LanguageModelMetrics()
    metrics.update(torch.tensor(1.0), 10)
    metrics.update(torch.tensor(4.0), 30)
    values = metrics.compute("val", bytes_per_token=4.0)
    assert values["val/loss"].item() == pytest.approx(3.25)
    assert values["val/ppl"].item() == pytest.approx(math.exp(3.25))
    assert values["val/bpb"].item() == pytest.approx(3.25 / 4.0 / math.log(2))
    assert "test/bpb" not in metrics.compute("test", bytes_per_token=None)


def test_logged_bits_per_byte_is_loss_times_tokens_per_byte_over_ln2(trained):
    stats = trained.dm.split_stats["validation"]
    expected = trained.after["val/loss"] * stats["tokens"] / stats["bytes"] / math.log(2)
    assert trained.after["val/bpb"] == pytest.approx(expected, rel=1e-5)
    assert trained.after["val/ppl"] == pytest.approx(math.exp(trained.after["val/loss"]), rel=1e-5)


# ----------------------------------------------------------------------------- training


def test_validation_loss_decreases_on_tinystories(trained):
    assert trained.before["val/loss"] == pytest.approx(math.log(VOCAB), abs=0.3)  # untrained: near uniform
    assert trained.after["val/loss"] < trained.before["val/loss"] - 0.5
    assert trained.task.global_step == STEPS


def test_data_hooks_record_tokenizer_bytes_per_token_and_eot_prompts(trained):
    hp = trained.task.hparams
    assert hp.tokenizer_fingerprint == trained.dm.tokenizer_fingerprint
    assert hp.bytes_per_token == pytest.approx(trained.dm.bytes_per_token)
    assert hp.prepend_eot is True  # stories are separated by <|endoftext|>


def test_sample_texts_continue_the_fixed_prompts_reproducibly(trained):
    samples = trained.task.sample_texts()
    assert [prompt for prompt, _ in samples] == ["Once upon a time", "One day, a little girl named Lily", "The cat"]
    assert all(isinstance(text, str) for _, text in samples)
    assert trained.task.sample_texts() == samples  # fixed generator seed


def test_sample_texts_without_a_tokenizer_is_empty():
    assert make_task().sample_texts() == []


# ----------------------------------------------------------------------------- the checkpoint


def test_checkpoint_stores_the_tokenizer(trained):
    checkpoint = torch.load(trained.checkpoint, weights_only=True)
    hp = checkpoint["hyper_parameters"]
    assert checkpoint["tiny_decoder"]["task"] == "lm"
    assert hp["tokenizer_fingerprint"] == trained.dm.tokenizer_fingerprint
    rebuilt = Tokenizer.from_str(hp["tokenizer_json"])
    assert tokenizer_lib.tokenizer_fingerprint(rebuilt) == trained.dm.tokenizer_fingerprint


def test_load_task_rebuilds_model_and_tokenizer(trained, loaded):
    assert isinstance(loaded, LanguageModel) and not loaded.training
    batch = next(iter(trained.dm.val_dataloader()))
    trained.task.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(batch["input"]), trained.task(batch["input"]))
    text = "Once upon a time, a cat sat."
    assert loaded.tokenizer.encode(text).ids == trained.dm.tokenizer.encode(text).ids
    assert loaded.eot_id == trained.dm.eot_id


def test_generation_from_the_checkpoint_stops_at_max_new_tokens(loaded):
    prompt = loaded.encode_prompt("Once upon a time")
    ids = torch.tensor([prompt])
    tokens = generate(loaded.model, ids, 7, temperature=0.8, top_k=50, eos_id=loaded.eot_id)
    assert len(prompt) < tokens.shape[1] <= len(prompt) + 7
    cfg = OmegaConf.create(
        {"prompt": "Once upon a time", "max_new_tokens": 7, "temperature": 0.0, "top_k": None, "top_p": None}
    )
    outputs = loaded.generate_outputs(typed_request(cfg, GenerationRequest))
    greedy = generate(loaded.model, ids, 7, temperature=0.0, eos_id=loaded.eot_id)[0, len(prompt) :].tolist()
    assert outputs == ["Once upon a time" + loaded.decode_continuation(greedy)]  # greedy: exactly these tokens
    assert len(loaded.tokenizer.encode(outputs[0]).ids) <= len(prompt) - 1 + 7


def test_generation_from_the_checkpoint_stops_at_eot(trained):
    task = load_task(str(trained.checkpoint))
    task.model.head = ForceToken(task.model.head, task.eot_id)
    ids = torch.tensor([task.encode_prompt("The cat")] * 2)
    tokens = generate(task.model, ids, 50, temperature=0.8, top_k=50, eos_id=task.eot_id)
    assert tokens.shape[1] == ids.shape[1] + 1 and bool((tokens[:, -1] == task.eot_id).all())
    assert task.continue_text("The cat", 50, num_samples=2) == ["", ""]


def test_decoded_continuation_ends_before_the_first_eot(loaded):
    hello, world = (loaded.tokenizer.encode(text).ids for text in (" Hello", " world"))
    assert loaded.decode_continuation(hello + [loaded.eot_id] + world) == " Hello"
    assert loaded.decode_continuation(hello + world) == " Hello world"


# ----------------------------------------------------------------------------- tokenizer checks


def test_another_tokenizer_is_refused_with_both_fingerprints(loaded, other_tokenizer, files, workdir):
    other = tokenizer_lib.tokenizer_fingerprint(Tokenizer.from_file(str(other_tokenizer)))
    ours = loaded.hparams.tokenizer_fingerprint
    assert other != ours
    cfg = evaluate_config(files["validation"], workdir, tokenizer_path=str(other_tokenizer))
    pattern = rf"tokenizer mismatch.*{re.escape(ours)}.*{re.escape(other)}.*data\.tokenizer_path"
    with pytest.raises(ValueError, match=pattern):
        loaded.evaluate_outputs(evaluation_request(cfg))
    with pytest.raises(ValueError, match=pattern):
        loaded.use_tokenizer(Tokenizer.from_file(str(other_tokenizer)))


def test_fitting_on_data_with_another_tokenizer_is_refused(loaded, other_tokenizer, files, workdir):
    dm = make_dm(files, workdir / "cache", tokenizer_path=str(other_tokenizer))
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        quiet_trainer(max_steps=1).fit(loaded, datamodule=dm)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(trained):
    with pytest.raises(ValueError, match="model.vocab_size"):
        make_task(vocab_size=VOCAB - 1).use_tokenizer(trained.dm.tokenizer)


# ----------------------------------------------------------------------------- evaluation


def evaluate_config(validation: str | None, workdir: Path, **data) -> OmegaConf:
    return OmegaConf.create(
        {
            "batch_size": 16,
            "max_blocks": None,
            "lambada": None,
            "lambada_limit": None,
            "data": {
                "_target_": "tiny_decoder.data.text.TextDataModule",
                "files": {"train": None, "validation": validation, "test": None},
                "hub_dataset": None,
                "text_format": "stories",
                "batch_size": 16,
                "cache_dir": str(workdir / "cache"),
                "tokenizer_path": None,
                **data,
            },
        }
    )


def test_evaluate_outputs_on_text_matches_the_validation_of_training(trained, loaded, files, workdir):
    results = loaded.evaluate_outputs(evaluation_request(evaluate_config(files["validation"], workdir)))
    assert results["val/loss"] == pytest.approx(trained.after["val/loss"], rel=1e-4)
    assert results["val/bpb"] == pytest.approx(trained.after["val/bpb"], rel=1e-4)
    assert results["val/ppl"] == pytest.approx(math.exp(results["val/loss"]), rel=1e-5)


def test_evaluate_outputs_needs_something_to_evaluate(loaded, workdir):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        loaded.evaluate_outputs(evaluation_request(evaluate_config(None, workdir)))


def test_read_lambada_splits_off_the_last_word(tmp_path):
    path = tmp_path / "lambada.jsonl"
    lines = [{"text": "He opened the door and saw his friend Tom"}, {"text": 'She said\n\n"hello" to Anna'}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    assert read_lambada(path) == [("He opened the door and saw his friend", "Tom"), ('She said\n\n"hello" to', "Anna")]
    assert read_lambada(path, limit=1) == [("He opened the door and saw his friend", "Tom")]


def test_pack_continuations_left_truncates_and_marks_only_target_tokens():
    inputs, targets = pack_continuations([(list(range(10, 20)), [7, 8]), ([5], [6])], context_length=4)
    assert inputs.tolist() == [[17, 18, 19, 7], [5, 0, 0, 0]]  # row 0: its last 5 tokens, minus the last
    assert targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_lambada_scores_match_a_direct_computation(loaded):
    pairs = [(loaded.encode_prompt("The little dog ran to the"), loaded.tokenizer.encode(" park").ids)]
    pairs.append((loaded.encode_prompt("Once upon a time there was a"), loaded.tokenizer.encode(" girl").ids))
    nll, correct, n_tokens = loaded.score_continuations(pairs)
    for i, (context, target) in enumerate(pairs):
        ids = torch.tensor([context + target])
        with torch.no_grad():
            log_probs = torch.log_softmax(loaded(ids[:, :-1]).float(), dim=-1)[0, -len(target) :]
        expected_nll = -log_probs.gather(1, torch.tensor(target)[:, None]).sum()
        assert nll[i].item() == pytest.approx(expected_nll.item(), rel=1e-4)
        assert bool(correct[i]) == (log_probs.argmax(dim=-1).tolist() == target)
        assert n_tokens[i].item() == len(target)


def test_lambada_evaluation_on_the_shared_file(loaded):
    results = loaded.evaluate_lambada(require(LAMBADA_FILE), limit=8, batch_size=4)
    assert results["lambada/passages"] == 8
    assert 0.0 <= results["lambada/acc"] <= 1.0
    assert all(math.isfinite(value) for value in results.values())
