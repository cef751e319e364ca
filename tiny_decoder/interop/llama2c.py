"""llama2.c's files: ``model.bin`` (the legacy layout ``run.c`` reads, "version 0", and the versioned fp32
layout, "version 1"), its ``.pt`` training checkpoints, and ``tokenizer.bin``.

Model files hold fp32 tensors in a fixed order after a header of seven int32 (dim, hidden_dim, n_layers,
n_heads, n_kv_heads, vocab_size, seq_len). Version 0: the vocabulary size is negative when the classifier is not
shared with the embedding, and two unused RoPE tables follow the final norm. Version 1: a 256-byte header
(magic ``ak42``, version, the seven ints, a shared-classifier byte), the norms first. q / k rows are stored in
llama2.c's interleaved RoPE layout (``llama.interleave_rope_rows``). Sizes are checked against the header, so
a truncated or foreign file fails with one line.

``tokenizer.bin``: the longest piece's length, then per token its score (float32), length (int32) and bytes.
``run.c`` starts every sequence with token 1 (its BOS) and stops when it samples token 1 again, so the export
moves this project's end-of-text token to id 1 (:func:`bos_first_order`: a permutation of the embedding rows,
the head rows and the pieces, which leaves the function unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from tokenizers import Tokenizer

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.interop.llama import (
    LlamaShape,
    LlamaWeights,
    interleave_rope_rows,
    rotate_half_rope_rows,
)

MAGIC = 0x616B3432  # "ak42"
VERSIONED_HEADER_BYTES = 256
HEADER = struct.Struct("<7i")
FLOAT_BYTES = 4
RUN_C_BOS = 1
RUN_C_NORM_EPS = 1e-5
RUN_C_ROPE_THETA = 10000.0
SUPPORTED_VERSIONS = (0, 1)


# ------------------------------------------------------------------ tensor order


def _layer_names(shape: LlamaShape, name: str) -> list[str]:
    return [f"layers.{i}.{name}.weight" for i in range(shape.n_layers)]


def tensor_order(shape: LlamaShape, version: int) -> list[str]:
    """The names of the tensors of a ``version`` file, in file order (the classifier last, when not shared)."""
    per_layer = {name: _layer_names(shape, name) for name in ("attention_norm", "ffn_norm")}
    matrices = [
        _layer_names(shape, name)
        for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
        + ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    ]
    wq, wk, wv, wo, w1, w2, w3 = matrices
    if version == 0:
        order = ["tok_embeddings.weight", *per_layer["attention_norm"], *wq, *wk, *wv, *wo]
        order += [*per_layer["ffn_norm"], *w1, *w2, *w3, "norm.weight", "freq_cis_real", "freq_cis_imag"]
    else:
        order = [*per_layer["attention_norm"], *per_layer["ffn_norm"], "norm.weight", "tok_embeddings.weight"]
        order += [*wq, *wk, *wv, *wo, *w1, *w2, *w3]
    return order if shape.tied else [*order, "output.weight"]


def tensor_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    kv_dim = shape.n_kv_heads * shape.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (shape.vocab_size, shape.dim),
        "norm.weight": (shape.dim,),
        "output.weight": (shape.vocab_size, shape.dim),
        "freq_cis_real": (shape.seq_len, shape.head_dim // 2),
        "freq_cis_imag": (shape.seq_len, shape.head_dim // 2),
    }
    per_layer = {
        "attention_norm": (shape.dim,),
        "ffn_norm": (shape.dim,),
        "attention.wq": (shape.dim, shape.dim),
        "attention.wk": (kv_dim, shape.dim),
        "attention.wv": (kv_dim, shape.dim),
        "attention.wo": (shape.dim, shape.dim),
        "feed_forward.w1": (shape.hidden_dim, shape.dim),
        "feed_forward.w2": (shape.dim, shape.hidden_dim),
        "feed_forward.w3": (shape.hidden_dim, shape.dim),
    }
    for name, dims in per_layer.items():
        shapes.update(dict.fromkeys(_layer_names(shape, name), dims))
    return shapes


def rope_tables(shape: LlamaShape) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos / sin tables version 0 still carries (``run.c`` skips them): llama2.c's ``precompute_freqs_cis``."""
    steps = torch.arange(0, shape.head_dim, 2)[: shape.head_dim // 2].float()
    freqs = 1.0 / (shape.rope_theta ** (steps / shape.head_dim))
    angles = torch.outer(torch.arange(shape.seq_len).float(), freqs)
    return angles.cos(), angles.sin()


# ------------------------------------------------------------------ writing


def check_run_c_shape(shape: LlamaShape) -> None:
    """``run.c`` hard-codes RMSNorm's eps, RoPE's base and bias-free projections: refuse anything else."""
    problems = {
        "model.bias=true (llama2.c's projections have no biases)": shape.bias,
        f"norm eps {shape.norm_eps} (run.c uses 1e-5)": shape.norm_eps != RUN_C_NORM_EPS,
        f"RoPE base {shape.rope_theta} (run.c uses 10000)": shape.rope_theta != RUN_C_ROPE_THETA,
    }
    for problem, present in problems.items():
        if present:
            raise ConfigError(f"llama2c cannot hold this model: it has {problem} (nothing was written)")


def write_model_bin(path: str | Path, shape: LlamaShape, weights: LlamaWeights, version: int = 0) -> None:
    """Write ``weights`` (rotate-half q / k rows, llama2.c names) as a llama2.c ``version`` model file."""
    if version not in SUPPORTED_VERSIONS:
        raise ConfigError(f"version={version}: llama2.c model files of version 0 (run.c) or 1 can be written")
    check_run_c_shape(shape)
    tensors = _file_tensors(shape, weights)
    with Path(path).open("wb") as out:
        _write_header(out, shape, version)
        for name in tensor_order(shape, version):
            out.write(tensors[name].float().contiguous().numpy().tobytes())


def _file_tensors(shape: LlamaShape, weights: LlamaWeights) -> dict[str, torch.Tensor]:
    tensors = dict(weights)
    for i in range(shape.n_layers):
        for name, heads in (("attention.wq", shape.n_heads), ("attention.wk", shape.n_kv_heads)):
            key = f"layers.{i}.{name}.weight"
            tensors[key] = interleave_rope_rows(weights[key], heads)
    tensors["freq_cis_real"], tensors["freq_cis_imag"] = rope_tables(shape)
    return tensors


def _write_header(out: BinaryIO, shape: LlamaShape, version: int) -> None:
    fields = [shape.dim, shape.hidden_dim, shape.n_layers, shape.n_heads, shape.n_kv_heads]
    if version == 0:
        out.write(HEADER.pack(*fields, shape.vocab_size if shape.tied else -shape.vocab_size, shape.seq_len))
        return
    out.write(struct.pack("<Ii", MAGIC, version))
    out.write(HEADER.pack(*fields, shape.vocab_size, shape.seq_len))
    out.write(struct.pack("<B", int(shape.tied)))
    out.write(b"\0" * (VERSIONED_HEADER_BYTES - out.tell()))


# ------------------------------------------------------------------ reading


def read_model_bin(path: str | Path) -> tuple[LlamaShape, LlamaWeights, int]:
    """``(shape, weights in the rotate-half layout, version)`` of a llama2.c model file."""
    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        raise ConfigError(f"{path}: {len(data)} bytes, too short for a llama2.c model file")
    (first,) = struct.unpack_from("<I", data)
    shape, version, offset = (
        _versioned_header(path, data) if first == MAGIC else (*_legacy_header(path, data), HEADER.size)
    )
    order = tensor_order(shape, version)
    shapes = tensor_shapes(shape)
    expected = offset + FLOAT_BYTES * sum(_numel(shapes[name]) for name in order)
    if len(data) != expected:
        raise ConfigError(
            f"{path}: {len(data)} bytes, but its header ({_describe(shape)}) needs {expected}: the file is truncated "
            "or not a llama2.c model"
        )
    weights: LlamaWeights = {}
    for name in order:
        count = _numel(shapes[name])
        weights[name] = torch.frombuffer(bytearray(data[offset : offset + FLOAT_BYTES * count]), dtype=torch.float32)
        weights[name] = weights[name].reshape(shapes[name])
        offset += FLOAT_BYTES * count
    weights.pop("freq_cis_real", None)
    weights.pop("freq_cis_imag", None)
    return shape, to_rotate_half(shape, weights), version


def _legacy_header(path: str | Path, data: bytes) -> tuple[LlamaShape, int]:
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = HEADER.unpack_from(data)
    return _checked_shape(path, dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, tied=vocab > 0), 0


def _versioned_header(path: str | Path, data: bytes) -> tuple[LlamaShape, int, int]:
    if len(data) < VERSIONED_HEADER_BYTES:
        raise ConfigError(f"{path}: {len(data)} bytes, too short for a versioned llama2.c model file")
    (version,) = struct.unpack_from("<i", data, 4)
    if version not in SUPPORTED_VERSIONS:
        raise ConfigError(
            f"{path}: a llama2.c version {version} file; versions 0 and 1 (fp32) can be read (version 2 is runq.c's "
            "int8 format: export the .pt checkpoint with version 1 instead)"
        )
    fields = HEADER.unpack_from(data, 8)
    (shared,) = struct.unpack_from("<B", data, 8 + HEADER.size)
    return _checked_shape(path, *fields, tied=bool(shared)), version, VERSIONED_HEADER_BYTES


def _checked_shape(path: str | Path, *fields: int, tied: bool) -> LlamaShape:
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = fields
    if min(fields) <= 0 or dim % heads or heads % kv_heads or (dim // heads) % 2:
        raise ConfigError(f"{path}: header {fields} is not a llama2.c model's (a wrong file, or not llama2.c's)")
    return LlamaShape(dim, hidden, layers, heads, kv_heads, vocab, seq_len, tied=tied)


def _numel(dims: Sequence[int]) -> int:
    count = 1
    for size in dims:
        count *= size
    return count


def _describe(shape: LlamaShape) -> str:
    return f"dim {shape.dim}, {shape.n_layers} layers, {shape.n_heads} heads, vocab {shape.vocab_size}"


def to_rotate_half(shape: LlamaShape, weights: LlamaWeights) -> LlamaWeights:
    """llama2.c's interleaved q / k rows in the rotate-half layout (the other tensors as they are)."""
    converted = dict(weights)
    for i in range(shape.n_layers):
        for name, heads in (("attention.wq", shape.n_heads), ("attention.wk", shape.n_kv_heads)):
            key = f"layers.{i}.{name}.weight"
            converted[key] = rotate_half_rope_rows(weights[key], heads)
    return converted


def read_checkpoint_pt(path: str | Path) -> tuple[LlamaShape, LlamaWeights]:
    """``(shape, weights in the rotate-half layout)`` of a llama2.c training checkpoint (``ckpt.pt``:
    ``{"model": state_dict, "model_args": {...}}``)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(
            f"{path}: cannot read this .pt file ({type(error).__name__}); it is truncated or not torch's"
        ) from error
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= set(checkpoint):
        raise ConfigError(f"{path}: not a llama2.c checkpoint (no 'model' and 'model_args' entries)")
    args = checkpoint["model_args"]
    state = {name.removeprefix("_orig_mod."): value.float() for name, value in checkpoint["model"].items()}
    hidden = state["layers.0.feed_forward.w1.weight"].shape[0] if "layers.0.feed_forward.w1.weight" in state else 0
    tied = "output.weight" not in state or torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    shape = _checked_shape(
        path,
        args["dim"],
        hidden,
        args["n_layers"],
        args["n_heads"],
        args.get("n_kv_heads") or args["n_heads"],
        args["vocab_size"],
        args["max_seq_len"],
        tied=tied,
    )
    shape = dataclasses.replace(shape, norm_eps=float(args.get("norm_eps", RUN_C_NORM_EPS)))
    return shape, to_rotate_half(shape, state)


# ------------------------------------------------------------------ vocabulary order and tokenizer.bin


def bos_first_order(vocab_size: int, bos_id: int) -> list[int]:
    """``order[new_id] = old_id`` moving ``bos_id`` to ``run.c``'s BOS id 1 (a swap; identity when it is 1)."""
    order = list(range(vocab_size))
    order[RUN_C_BOS], order[bos_id] = order[bos_id], order[RUN_C_BOS]
    return order


def reorder_vocabulary(shape: LlamaShape, weights: LlamaWeights, order: list[int]) -> LlamaWeights:
    """The same model with token ``order[i]`` renamed ``i``: the embedding and head rows permuted."""
    index = torch.tensor(order)
    permuted = dict(weights)
    for name in ("tok_embeddings.weight", "output.weight"):
        if name in weights:
            permuted[name] = weights[name].index_select(0, index)
    return permuted


def reorder_tokenizer(tokenizer: Tokenizer, order: list[int]) -> Tokenizer:
    """``tokenizer`` with token ``order[i]`` renamed ``i`` (the vocabulary order of :func:`reorder_vocabulary`);
    merges name tokens by their text, so only the ids change."""
    new_id = {old: new for new, old in enumerate(order)}
    spec = json.loads(tokenizer.to_str())
    spec["model"]["vocab"] = {piece: new_id.get(index, index) for piece, index in spec["model"]["vocab"].items()}
    for added in spec.get("added_tokens", []):
        added["id"] = new_id.get(added["id"], added["id"])
    return Tokenizer.from_str(json.dumps(spec))


def token_pieces(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each token id stands for: byte-level BPE tokens through GPT-2's byte alphabet, SentencePiece
    pieces with ``▁`` as a space (their ``<0xNN>`` byte pieces as they are: ``run.c`` parses them)."""
    byte_level = (json.loads(tokenizer.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
    alphabet = _byte_level_decoding()
    pieces = []
    for token_id in range(tokenizer.get_vocab_size()):
        piece = tokenizer.id_to_token(token_id) or ""
        if byte_level and all(char in alphabet for char in piece):
            pieces.append(bytes(alphabet[char] for char in piece))
        else:
            pieces.append(piece.replace("▁", " ").encode())
    return pieces


def _byte_level_decoding() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


def merge_scores(tokenizer: Tokenizer) -> list[float]:
    """A score per token for ``run.c``'s encoder, which merges the adjacent pair whose result scores highest:
    minus the rank of the BPE merge that makes the token (0 for tokens no merge makes)."""
    model = json.loads(tokenizer.to_str())["model"]
    scores = [0.0] * tokenizer.get_vocab_size()
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        token_id = tokenizer.token_to_id(left + right)
        if token_id is not None and scores[token_id] == 0.0:
            scores[token_id] = -float(rank + 1)
    return scores


def write_tokenizer_bin(path: str | Path, pieces: Sequence[bytes], scores: Sequence[float]) -> None:
    with Path(path).open("wb") as out:
        out.write(struct.pack("<I", max(len(piece) for piece in pieces)))
        for piece, score in zip(pieces, scores, strict=True):
            out.write(struct.pack("<fI", score, len(piece)))
            out.write(piece)


def read_tokenizer_bin(path: str | Path, vocab_size: int) -> tuple[int, list[bytes], list[float]]:
    """``(max piece length, pieces, scores)`` of a ``tokenizer.bin`` of ``vocab_size`` tokens."""
    data = Path(path).read_bytes()
    (max_length,) = struct.unpack_from("<I", data)
    offset, pieces, scores = 4, [], []
    try:
        for _ in range(vocab_size):
            score, length = struct.unpack_from("<fI", data, offset)
            pieces.append(data[offset + 8 : offset + 8 + length])
            scores.append(score)
            offset += 8 + length
    except struct.error as error:
        raise ConfigError(f"{path}: ends before its {vocab_size} tokens (truncated, or another vocabulary)") from error
    return max_length, pieces, scores
