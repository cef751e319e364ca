"""Knowledge distillation: the KD term (>= 0, zero for logits that differ by a per-row constant, T^2 scaling),
the combined loss on both tasks, a frozen eval-mode teacher, refused teachers, and a distilled CLI run."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from tests.helpers import tiny_sequence_overrides
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model import ModelConfig
from tiny_decoder.run.fit import fit_and_test
from tiny_decoder.tasks.callbacks import KnowledgeDistillation, check_teacher
from tiny_decoder.tasks.language_model import LanguageModel
from tiny_decoder.tasks.sequence_predictor import SequencePredictor
from tiny_decoder.training.distillation import Distiller, kd_loss
from tiny_decoder.training.losses import distance_weighted_cross_entropy, next_token_cross_entropy

TINY = dict(vocab_size=32, context_length=8, d_model=16, n_layers=2, n_heads=2, d_ff=32)


def _config(**overrides) -> dict:
    return ModelConfig(**{**TINY, **overrides}).to_dict()


def _batch(vocab: int = 32) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (4, 9))
    return {"input": ids[:, :-1], "target": ids[:, 1:]}


def _save(task, path) -> str:
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return str(path)


def test_kd_loss_is_non_negative_and_zero_for_a_per_row_shift():
    torch.manual_seed(0)
    teacher = torch.randn(4, 8, 32)
    for temperature in (0.5, 1.0, 4.0):
        assert kd_loss(torch.randn(4, 8, 32) * 3, teacher, temperature) > 0
        shifted = teacher + torch.randn(4, 8, 1) * 10  # softmax is invariant to a constant per row
        assert kd_loss(shifted, teacher, temperature) == pytest.approx(0.0, abs=1e-5)


def test_kd_loss_is_t_squared_times_the_mean_kl_per_position():
    torch.manual_seed(1)
    student, teacher, t = torch.randn(3, 5, 16), torch.randn(3, 5, 16), 3.0
    p = torch.softmax(teacher / t, dim=-1)
    kl = (p * (p.log() - torch.log_softmax(student / t, dim=-1))).sum(-1).mean()
    assert kd_loss(student, teacher, t) == pytest.approx(t**2 * float(kl), rel=1e-5)


def test_t_squared_keeps_the_gradient_size_as_the_temperature_grows():
    torch.manual_seed(2)
    teacher = torch.randn(64, 16)

    def grad_norm(temperature: float) -> float:
        student = torch.randn(64, 16, generator=torch.Generator().manual_seed(3)).requires_grad_()
        kd_loss(student, teacher, temperature).backward()
        return float(student.grad.norm())

    # d(T^2 KL)/dz = T (q - p) -> (z_s - z_t - row means) / V for large T: a fixed size
    assert grad_norm(20.0) == pytest.approx(grad_norm(40.0), rel=0.02)
    assert grad_norm(40.0) == pytest.approx(grad_norm(80.0), rel=0.01)


@pytest.mark.parametrize("task_cls", [SequencePredictor, LanguageModel])
def test_training_loss_mixes_kd_and_the_task_loss_on_both_tasks(task_cls):
    torch.manual_seed(0)
    student, teacher = task_cls(model=_config()), task_cls(model=_config())
    batch = _batch()
    logits = student(batch["input"])
    hard = student.loss(logits, batch["target"])
    reference = {SequencePredictor: distance_weighted_cross_entropy, LanguageModel: next_token_cross_entropy}
    assert torch.equal(hard, reference[task_cls](logits, batch["target"]))  # the sequence task keeps its weighting
    assert torch.equal(student.training_loss(batch), hard)
    student.distiller = Distiller(teacher.model, alpha=0.3, temperature=2.0)
    soft = kd_loss(logits, teacher(batch["input"]), 2.0)
    assert float(student.training_loss(batch)) == pytest.approx(float(0.3 * soft + 0.7 * hard), rel=1e-6)
    student.distiller = Distiller(student.model, alpha=1.0, temperature=2.0)  # its own teacher: nothing to learn
    assert float(student.training_loss(batch)) == pytest.approx(0.0, abs=1e-6)


def test_the_teacher_runs_in_eval_mode_without_gradients():
    torch.manual_seed(0)
    student, teacher = SequencePredictor(model=_config()), SequencePredictor(model=_config(dropout=0.5))
    student.distiller = Distiller(teacher.model.train(), alpha=0.5, temperature=1.0)
    student.train()
    student.training_loss(_batch()).backward()
    assert not teacher.model.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert all(p.grad is not None for p in student.model.parameters() if p.requires_grad)
    assert not any(k.startswith("distiller") for k in student.state_dict())


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        (lambda: LanguageModel(model=_config()), "a teacher of task 'lm' cannot teach a 'sequence' task"),
        (lambda: SequencePredictor(model=_config(vocab_size=64)), "vocabulary has 64 tokens, the student's 32"),
        (lambda: SequencePredictor(model=_config(context_length=4)), "context \\(4\\) is shorter"),
    ],
)
def test_a_teacher_of_another_task_or_vocabulary_is_refused(tmp_path, teacher, message):
    student = SequencePredictor(model=_config())
    with pytest.raises(ConfigError, match=message):
        check_teacher(teacher(), student, "teacher.ckpt")
    path = _save(teacher(), tmp_path / "teacher.ckpt")
    with pytest.raises(ConfigError, match=message):
        KnowledgeDistillation(path).on_fit_start(None, student)


def test_bad_options_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="distillation.teacher_ckpt=PATH"):
        KnowledgeDistillation(None)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        KnowledgeDistillation(str(tmp_path / "missing.ckpt"))
    path = _save(SequencePredictor(model=_config()), tmp_path / "t.ckpt")
    with pytest.raises(ConfigError, match="alpha"):
        KnowledgeDistillation(path, alpha=1.5)


def test_cli_distills_a_smaller_student_from_a_teacher_run(compose_config, tmp_path):
    small = ["model.d_model=32", "model.n_layers=1", "model.d_ff=64"]
    teacher_cfg = compose_config("+experiment=sequence_ablation", *tiny_sequence_overrides(1), *small)
    with open_dict(teacher_cfg):
        teacher_cfg.paths.output_dir = str(tmp_path / "teacher")
    teacher_run = fit_and_test(teacher_cfg)
    teacher_ckpt = teacher_run.results["best_checkpoint"]
    before = {k: v.clone() for k, v in teacher_run.task.state_dict().items()}
    options = ["distillation=kd", f"distillation.teacher_ckpt={teacher_ckpt}", "model.d_model=16", "model.n_heads=2"]
    student = fit_and_test(
        compose_config("+experiment=sequence_ablation", *tiny_sequence_overrides(1), *small, *options)
    )
    assert student.results["train"]["train/kd_loss"] > 0 and "train/task_loss" in student.results["train"]
    assert student.results["parameters"] < teacher_run.results["parameters"]
    assert student.task.distiller is None  # detached after fitting
    state = torch.load(student.results["best_checkpoint"], weights_only=True)["state_dict"]
    assert set(state) == set(student.task.state_dict())  # no teacher weights in the student's checkpoint
    teacher_after = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(teacher_after[k], v) for k, v in before.items())
