"""llama2.c's SentencePiece tokenizers: a BPE ``.model`` trained here the way llama2.c trains its own
(``tinystories.py train_vocab``: byte fallback, identity normalization) becomes a ``tokenizers`` tokenizer that
encodes the shared stories and awkward strings exactly as ``sentencepiece`` does and decodes them back; with it
a llama2.c checkpoint converts into a language model that starts and ends its stories at ``<s>``."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_module
from tests.interop.models import llama2c_state, story_texts
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.interop.spm_tokenizer import sentencepiece_tokenizer, special_piece
from tiny_decoder.tasks import load_task

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")

AWKWARD = ["héllo  wörld ☃ 123", " leading space", "trailing  ", "tabs\tand\nnewlines", "  two", "日本語", "", "<s> x"]


def train_spm(tmp_path, vocab: int = 400, **options) -> str:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text.strip() for text in story_texts(600)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tok"), model_type="bpe", vocab_size=vocab,
        character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True, byte_fallback=True,
        normalization_rule_name="identity", num_threads=1, minloglevel=2, **options,
    )  # fmt: skip
    return str(tmp_path / "tok.model")


@pytest.mark.parametrize("extra_spaces", [True, False], ids=["llama2c_default", "kept_spaces"])
def test_encodes_and_decodes_exactly_as_sentencepiece(tmp_path, extra_spaces):
    path = train_spm(tmp_path, remove_extra_whitespaces=extra_spaces)
    reference, ours = spm.SentencePieceProcessor(model_file=path), sentencepiece_tokenizer(path)
    assert ours.get_vocab_size() == reference.vocab_size()
    texts = [line for text in story_texts(300) for line in text.split("\n")] + AWKWARD
    assert [ours.encode(text, add_special_tokens=False).ids for text in texts] == [reference.encode(t) for t in texts]
    assert any(reference.id_to_piece(i).startswith("<0x") for t in AWKWARD for i in reference.encode(t))  # bytes used
    assert [ours.decode(reference.encode(text)) for text in texts] == [
        reference.decode(reference.encode(t)) for t in texts
    ]
    assert special_piece(path, "bos") == "<s>" and ours.token_to_id("<s>") == reference.bos_id()


@pytest.mark.slow  # processes / compilation: tens of seconds (CI runs -m slow too)
def test_llama2c_checkpoint_converts_into_a_story_model(tmp_path):
    path = train_spm(tmp_path)
    state = llama2c_state(n_layers=1, dim=32, hidden=64, n_heads=4, n_kv_heads=2, vocab=400)
    args = {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 400, "max_seq_len": 32}
    torch.save({"model": state, "model_args": args}, tmp_path / "ckpt.pt")
    out = tmp_path / "imported.ckpt"
    result = run_module("tiny_decoder.convert", f"src={tmp_path / 'ckpt.pt'}", f"tokenizer={path}", f"out={out}")
    assert result.returncode == 0, result.stderr
    assert "d_model 32, 1 layers, 4 heads, vocab 400" in result.stdout
    task = load_task(out)
    reference = spm.SentencePieceProcessor(model_file=path)
    assert task.eot_id == reference.bos_id() == task.encode_prompt("Once")[0]
    assert task.encode_prompt("Once upon a time") == [1, *reference.encode("Once upon a time")]
    generated = run_module("tiny_decoder.generate", f"ckpt={out}", "prompt=Once upon a time", "temperature=0",
                           "max_new_tokens=8")  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("Once upon a time")


def test_a_file_that_is_not_a_sentencepiece_model_fails_with_one_line(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"\x00\x01not a proto")
    with pytest.raises(ConfigError, match=r"bad.model: not a SentencePiece .model file"):
        sentencepiece_tokenizer(tmp_path / "bad.model")
    with pytest.raises(ConfigError, match="no such file"):
        sentencepiece_tokenizer(tmp_path / "missing.model")
