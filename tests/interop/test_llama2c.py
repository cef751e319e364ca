"""llama2.c's files: a project model written as ``model.bin`` (versions 0 and 1) reads back bit for bit; its
``.pt`` checkpoints and ``.bin`` files import with the logits of llama2.c's own forward pass (a reference of
its ``model.py`` in ``models.py``: interleaved RoPE, grouped-query attention as in stories260K); the vocabulary
reorder that gives ``run.c`` its BOS leaves the function unchanged; damaged or foreign files fail with one
line. (Decoding the export with the real ``run.c`` is ``benchmarks/generation.py``'s job, given llama2.c.)"""

from __future__ import annotations

import struct

import pytest
import torch

from tests.interop.models import LLAMA, VOCAB, bpe_tokenizer, checkpoint, language_model, llama2c_logits, llama2c_state
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.interop import llama2c
from tiny_decoder.interop.llama import LlamaShape, interleave_rope_rows, llama_model, llama_weights
from tiny_decoder.tasks import load_task

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("version", [0, 1])
def test_model_bin_reads_back_bit_for_bit(tmp_path, tokenizer, version, tied):
    task = language_model(tokenizer, **LLAMA, tie_embeddings=tied)
    shape, weights = llama_weights(task.model)
    path = tmp_path / "model.bin"
    llama2c.write_model_bin(path, shape, weights, version)
    header = 256 if version == 1 else 28
    tensors = sum(value.numel() for name, value in weights.items() if not (tied and name == "output.weight"))
    rope_tables = shape.seq_len * shape.head_dim if version == 0 else 0
    assert path.stat().st_size == header + 4 * (tensors + rope_tables)
    read_shape, read_weights, read_version = llama2c.read_model_bin(path)
    assert (read_shape, read_version) == (shape, version)
    assert set(read_weights) == set(weights) - ({"output.weight"} if tied else set())
    for name, value in read_weights.items():
        assert torch.equal(value, weights[name]), name
    model = llama_model(read_shape, read_weights)
    ids = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        assert torch.equal(model(ids), task.model(ids))


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_pt_checkpoint_imports_with_llama2c_logits(tmp_path, kv_heads):
    state = llama2c_state(n_layers=2, dim=32, hidden=72, n_heads=4, n_kv_heads=kv_heads, vocab=VOCAB)
    args = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": kv_heads, "vocab_size": VOCAB, "multiple_of": 8,
            "max_seq_len": 40, "dropout": 0.0}  # fmt: skip
    compiled = {f"_orig_mod.{name}": value for name, value in state.items()}  # saved from a torch.compile'd model
    torch.save({"model": compiled, "model_args": args, "iter_num": 10}, tmp_path / "ckpt.pt")
    shape, weights = llama2c.read_checkpoint_pt(tmp_path / "ckpt.pt")
    assert (shape.n_kv_heads, shape.hidden_dim, shape.tied) == (kv_heads, 72, False)
    model = llama_model(shape, weights)
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), llama2c_logits(state, 2, 4, kv_heads, ids), atol=TOLERANCE, rtol=0)


def test_bin_written_by_llama2c_layout_imports_with_its_logits(tmp_path):
    """A version-0 file laid out as llama2.c's export.py writes it (interleaved rows, the tables it adds)."""
    state = llama2c_state(n_layers=2, dim=32, hidden=72, n_heads=4, n_kv_heads=2, vocab=VOCAB, seed=3)
    shape = LlamaShape(dim=32, hidden_dim=72, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, seq_len=40,
                       tied=False)  # fmt: skip
    tables = dict(zip(("freq_cis_real", "freq_cis_imag"), llama2c.rope_tables(shape), strict=True))
    with (tmp_path / "model.bin").open("wb") as out:
        out.write(struct.pack("<7i", 32, 72, 2, 4, 2, -VOCAB, 40))
        for name in llama2c.tensor_order(shape, 0):
            out.write({**state, **tables}[name].contiguous().numpy().tobytes())
    read_shape, weights, _ = llama2c.read_model_bin(tmp_path / "model.bin")
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        ours = llama_model(read_shape, weights)(ids)
    torch.testing.assert_close(ours, llama2c_logits(state, 2, 4, 2, ids), atol=TOLERANCE, rtol=0)


def test_rope_row_layouts_are_inverse_permutations():
    weight = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    interleaved = interleave_rope_rows(weight, n_heads=2)
    assert interleaved[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # head 0 pairs (0, 2), (1, 3)
    assert torch.equal(llama2c.to_rotate_half(LlamaShape(3, 1, 1, 2, 2, 1, 1), {
        "layers.0.attention.wq.weight": interleaved, "layers.0.attention.wk.weight": interleaved,
    })["layers.0.attention.wq.weight"], weight)  # fmt: skip


def test_bos_reorder_keeps_the_function_and_the_tokenizer_follows(tmp_path, tokenizer):
    task = language_model(tokenizer, **LLAMA)
    assert task.eot_id == 0
    shape, weights = llama_weights(task.model)
    order = llama2c.bos_first_order(shape.vocab_size, task.eot_id)
    assert order[:3] == [1, 0, 2]
    moved = llama_model(shape, llama2c.reorder_vocabulary(shape, weights, order))
    renamed = llama2c.reorder_tokenizer(tokenizer, order)
    assert renamed.token_to_id("<|endoftext|>") == 1
    text = "Once upon a time, there was a girl."
    new_ids = renamed.encode(text).ids
    assert [order[i] for i in new_ids] == tokenizer.encode(text).ids and renamed.decode(new_ids) == text
    ids = torch.randint(0, VOCAB, (2, 48))
    old_ids = torch.tensor(order)[ids]
    with torch.no_grad():
        assert torch.equal(moved(ids), task.model(old_ids)[..., order])


def test_tokenizer_bin_holds_each_tokens_bytes_and_reads_back(tmp_path, tokenizer):
    pieces, scores = llama2c.token_pieces(tokenizer), llama2c.merge_scores(tokenizer)
    assert pieces[tokenizer.token_to_id("Ġthe")] == b" the" and pieces[0] == b"<|endoftext|>"
    assert all(pieces[tokenizer.token_to_id(chr(c))] == bytes([c]) for c in b"az!~")
    assert len(set(pieces)) == len(pieces)  # byte-level BPE: every token its own bytes
    later = tokenizer.encode(" the").ids[0]  # a merged token scores by its merge's rank (earlier = higher)
    assert scores[later] < 0 and scores[tokenizer.token_to_id("a")] == 0.0
    llama2c.write_tokenizer_bin(tmp_path / "tokenizer.bin", pieces, scores)
    max_length, read_pieces, read_scores = llama2c.read_tokenizer_bin(tmp_path / "tokenizer.bin", len(pieces))
    assert (max_length, read_pieces, read_scores) == (max(map(len, pieces)), pieces, scores)


@pytest.mark.slow  # processes / compilation: tens of seconds (CI runs -m slow too)
def test_export_and_convert_commands_round_trip(tmp_path, tokenizer):
    from tests.helpers import run_module

    source = checkpoint(tmp_path, tokenizer, **LLAMA)
    exported = run_module("tiny_decoder.export", f"ckpt={source}", "format=llama2c", f"out={tmp_path / 'l2c'}")
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.name for p in (tmp_path / "l2c").iterdir()) == ["model.bin", "tokenizer.bin", "tokenizer.json"]
    converted = run_module(
        "tiny_decoder.convert", f"src={tmp_path / 'l2c' / 'model.bin'}", f"out={tmp_path / 'back.ckpt'}"
    )
    assert converted.returncode == 0, converted.stderr
    assert converted.stderr.strip() == ""  # no warnings, no progress bars
    original, back = load_task(source), load_task(tmp_path / "back.ckpt")
    assert back.eot_id == 1 and back.decode_continuation(back.encode_prompt("A cat.")[1:]) == "A cat."
    order = torch.tensor(llama2c.bos_first_order(VOCAB, original.eot_id))
    ids = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        assert torch.equal(back.model(ids), original.model(order[ids])[..., order])


def test_damaged_and_foreign_files_fail_with_one_line(tmp_path, tokenizer):
    shape, weights = llama_weights(language_model(tokenizer, **LLAMA).model)
    llama2c.write_model_bin(tmp_path / "model.bin", shape, weights)
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"cut.bin: \d+ bytes, but its header .* needs \d+: the file is truncated"):
        llama2c.read_model_bin(tmp_path / "cut.bin")
    (tmp_path / "noise.bin").write_bytes(b"\x07" * 1000)
    with pytest.raises(ConfigError, match="is not a llama2.c model's|truncated or not a llama2.c model"):
        llama2c.read_model_bin(tmp_path / "noise.bin")
    (tmp_path / "v2.bin").write_bytes(struct.pack("<Ii", llama2c.MAGIC, 2) + b"\0" * 300)
    with pytest.raises(ConfigError, match="version 2 file; versions 0 and 1"):
        llama2c.read_model_bin(tmp_path / "v2.bin")
    (tmp_path / "not.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot read this .pt file"):
        llama2c.read_checkpoint_pt(tmp_path / "not.pt")
    with pytest.raises(ConfigError, match="RoPE base 500.0"):
        llama2c.write_model_bin(tmp_path / "x.bin", LlamaShape(32, 64, 1, 4, 4, 8, 8, rope_theta=500.0), {})
