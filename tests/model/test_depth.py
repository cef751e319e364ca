"""Depth strategies: LayerDrop (p=0 is the static model, eval is deterministic, keep_layers sub-networks) and
CALM-style early exit (a threshold that never fires is full depth, cached == uncached, per-layer exits), and the
depth option surviving a checkpoint reload."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model import DecoderTransformer
from tiny_decoder.model.depth import EXIT_WEIGHTS, EarlyExit, LayerDrop
from tiny_decoder.model.generation import generate

VOCAB, LENGTH, BATCH = 11, 12, 3
PIECES = (3, 4, 1, 1, 1, 1, 1)


def _ids(length: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, length))


def _same_weights(build, **depth) -> tuple[DecoderTransformer, DecoderTransformer]:
    """A static model and one with ``depth`` and the same weights (a depth strategy has no parameters)."""
    return build(n_layers=3), build(n_layers=3, depth=depth)


def _decode(model: DecoderTransformer, ids: torch.Tensor) -> torch.Tensor:
    cache, start, outputs = model.new_cache(ids.shape[0]), 0, []
    for size in PIECES:
        outputs.append(model(ids[:, start : start + size], cache))
        start += size
    return torch.cat(outputs, dim=1)


def _manual(model: DecoderTransformer, ids: torch.Tensor, layers: list[int]) -> torch.Tensor:
    x, inputs = model.embed(ids)
    for i in layers:
        x = model.blocks[i](x, inputs, None)
    return model.readout(x)


# ----------------------------------------------------------------------------------------------- layerdrop


def test_layerdrop_with_p_zero_equals_the_base_model(build):
    static, dropped = _same_weights(build, name="layerdrop", p=0.0)
    ids = _ids()
    assert_close(dropped(ids), static(ids), rtol=0, atol=0)
    static.train(), dropped.train()
    torch.manual_seed(3)
    expected = static(ids)
    torch.manual_seed(3)
    assert_close(dropped(ids), expected, rtol=0, atol=0)  # no draw: the same RNG stream as well


def test_layerdrop_is_random_in_training_and_deterministic_in_eval(build):
    model = build(n_layers=3, depth={"name": "layerdrop", "p": 0.5})
    ids = _ids()
    assert_close(model(ids), model(ids), rtol=0, atol=0)
    assert_close(model(ids), _manual(model, ids, [0, 1, 2]), rtol=0, atol=1e-12)
    assert model.depth.layers_per_token == 3.0
    model.train()
    outputs = [model(ids) for _ in range(8)]
    assert any(not torch.allclose(outputs[0], out) for out in outputs[1:])


def test_layerdrop_keep_layers_runs_that_sub_network_cached_and_not(build):
    model = build(n_layers=3, depth={"name": "layerdrop", "p": 0.2, "keep_layers": [2, 0]})
    ids = _ids()
    full = model(ids)
    assert model.depth.keep_layers == [0, 2] and model.depth.layers_per_token == 2.0
    assert_close(full, _manual(model, ids, [0, 2]), rtol=0, atol=1e-12)
    assert_close(_decode(model, ids), full, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("options", "field"), [({"p": 1.0}, "model.depth.p"), ({"keep_layers": [0, 3]}, "keep_layers")]
)
def test_layerdrop_refuses_bad_options(make_config, options, field):
    with pytest.raises(ConfigError, match=field):
        DecoderTransformer(make_config(depth={"name": "layerdrop", **options}))


# ----------------------------------------------------------------------------------------------- early exit


def test_early_exit_that_never_fires_equals_full_depth(build):
    static, early = _same_weights(build, name="early_exit", threshold=2.0)
    ids = _ids()
    assert_close(early(ids), static(ids), rtol=0, atol=0)
    assert early.depth.layers_per_token == 3.0
    assert_close(_decode(early, ids), static(ids), rtol=0, atol=1e-9)


def test_early_exit_that_always_fires_stops_after_the_first_layer(build):
    model = build(n_layers=3, depth={"name": "early_exit", "threshold": -1.0})
    ids = _ids()
    assert_close(model(ids), _manual(model, ids, [0]), rtol=0, atol=1e-12)
    assert model.depth.layers_per_token == 1.0


@pytest.mark.parametrize("confidence", ["softmax", "max_prob", "saturation"])
def test_cached_generation_equals_uncached_under_early_exit(build, confidence):
    model = build(n_layers=3, depth={"name": "early_exit", "threshold": 2.0, "confidence": confidence})
    ids = _ids()
    # a threshold that stops about half of the tokens after layer 1: the median layer-1 confidence
    with torch.no_grad():
        x, inputs = model.embed(ids)
        scores = model.depth.confidence(model.readout, model.blocks[0](x, inputs, None), x)
    model.depth.threshold = float(scores.median())
    full = model(ids)
    used = model.depth.layers_used
    assert used.min() == 1 and used.max() > 1  # some tokens exit, some go deeper
    assert_close(_decode(model, ids), full, rtol=0, atol=1e-9)
    prompt = ids[:, :4]
    cached = generate(model, prompt, max_new_tokens=LENGTH - 4)
    assert torch.equal(cached, generate(model, prompt, max_new_tokens=LENGTH - 4, use_cache=False))


def test_exited_tokens_keep_their_state_and_later_layers_still_cache_them(build):
    model = build(n_layers=3, depth={"name": "early_exit", "threshold": -1.0})
    ids = _ids()
    cache = model.new_cache(BATCH)
    model(ids, cache)
    # every token exits after layer 1 and keeps its layer-1 state h1: layers 2 and 3 still cache keys and values,
    # computed from h1, so later tokens can attend to it
    by_hand = model.new_cache(BATCH)
    with torch.no_grad():
        x, inputs = model.embed(ids, by_hand)
        h1 = model.blocks[0](x, inputs, by_hand)
        for block in model.blocks[1:]:
            block(h1, inputs, by_hand)
    for layer in (1, 2):
        assert cache.keys[layer][:, :, :LENGTH].abs().sum() > 0
        assert_close(cache.keys[layer][:, :, :LENGTH], by_hand.keys[layer][:, :, :LENGTH], rtol=0, atol=1e-6)
        assert_close(cache.values[layer][:, :, :LENGTH], by_hand.values[layer][:, :, :LENGTH], rtol=0, atol=1e-6)


def test_early_exit_trains_every_layer_and_static_only_the_output(build):
    static, early = _same_weights(build, name="early_exit")
    ids = _ids()
    static.train(), early.train()
    [only] = static.exit_logits(ids)
    assert_close(only, static(ids), rtol=0, atol=0)
    exits = early.exit_logits(ids)
    assert len(exits) == 3
    assert_close(exits[-1], static(ids), rtol=0, atol=1e-12)
    assert_close(exits[0], _manual(early, ids, [0]), rtol=0, atol=1e-12)
    assert early.depth.exit_weights(3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert static.depth.exit_weights(1) == [1.0]
    assert sum(EXIT_WEIGHTS.get("uniform")(4)) == pytest.approx(1.0)


def test_early_exit_names_unknown_options(make_config):
    with pytest.raises(ConfigError, match="choose one of: softmax, max_prob, saturation"):
        DecoderTransformer(make_config(depth={"name": "early_exit", "confidence": "entropy"}))
    with pytest.raises(ConfigError, match="model.depth.threshold"):
        DecoderTransformer(make_config(depth={"name": "early_exit", "threshold": "high"}))


# ----------------------------------------------------------------------------------------------- reload


@pytest.mark.parametrize(
    ("depth", "cls"),
    [
        ({"name": "early_exit", "threshold": 0.5, "confidence": "saturation"}, EarlyExit),
        ({"name": "layerdrop", "p": 0.3, "keep_layers": [1]}, LayerDrop),
    ],
)
def test_depth_option_survives_checkpoint_reload(tmp_path, make_config, depth, cls):
    from tiny_decoder.tasks import load_task
    from tiny_decoder.tasks.sequence_predictor import SequencePredictor

    task = SequencePredictor(model=make_config(depth=depth).to_dict())
    path = tmp_path / "task.ckpt"
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    loaded = load_task(str(path))
    assert isinstance(loaded.model.depth, cls) and loaded.model_config.depth == depth
    ids = torch.randint(0, VOCAB, (2, 6))
    assert_close(loaded(ids), task.eval()(ids), rtol=0, atol=0)
