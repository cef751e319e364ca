"""The Llama layout shared by Hugging Face's ``LlamaForCausalLM`` and llama2.c: :class:`LlamaShape` (its
hyper-parameters) and a flat dict of tensors under llama2.c's names (``tok_embeddings.weight``,
``layers.{i}.attention.wq.weight``, ``layers.{i}.feed_forward.w1.weight`` = SwiGLU's gate, ...), with q / k in
the **rotate-half** RoPE layout of this project and of Hugging Face. llama2.c stores them **interleaved**:
:func:`interleave_rope_rows` / :func:`rotate_half_rope_rows` convert one way and the other.

:func:`llama_weights` reads them off a project model (checked by ``families.check_family`` first);
:func:`llama_model` builds the project model that computes the same function. Grouped-query checkpoints
(``n_kv_heads < n_heads``, e.g. llama2.c's stories260K) are imported exactly by repeating each key / value head
for the query heads that share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.interop.families import check_family
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.feedforward import swiglu_hidden_size
from tiny_decoder.model.transformer import DecoderTransformer

LlamaWeights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LlamaShape:
    """A Llama model's hyper-parameters (llama2.c's header fields, plus what Hugging Face's config adds)."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    tied: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def llama_shape(model: DecoderTransformer) -> LlamaShape:
    config = model.config
    return LlamaShape(
        dim=config.d_model,
        hidden_dim=int(_layer_tensors(model.layers[0])["feed_forward.w1"][0].shape[0]),
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        n_kv_heads=config.n_heads,
        vocab_size=config.vocab_size,
        seq_len=config.context_length,
        tied=model.head.weight is model.embedding.weight,
        norm_eps=float(config.norm["eps"]),
        rope_theta=float(config.positional.get("base", 10000.0)),
        bias=config.bias,
    )


def _norm_weight(norm: torch.nn.Module, dim: int) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    return torch.ones(dim) if weight is None else weight.detach().float().cpu()  # affine=false: a weight of ones


def llama_weights(model: DecoderTransformer, target: str = "the Llama layout") -> tuple[LlamaShape, LlamaWeights]:
    """``model``'s shape and fp32 tensors under llama2.c's names (rotate-half q / k rows)."""
    check_family(model, "llama", target)
    shape = llama_shape(model)
    weights: LlamaWeights = {"tok_embeddings.weight": model.embedding.weight.detach().float().cpu()}
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}."
        for name, (weight, bias) in _layer_tensors(block).items():
            weights[f"{prefix}{name}.weight"] = weight.detach().float().cpu().clone()
            if bias is not None:
                weights[f"{prefix}{name}.bias"] = bias.detach().float().cpu().clone()
        weights[f"{prefix}attention_norm.weight"] = _norm_weight(block.norm_attn, shape.dim)
        weights[f"{prefix}ffn_norm.weight"] = _norm_weight(block.norm_ff, shape.dim)
    weights["norm.weight"] = _norm_weight(model.final_norm, shape.dim)
    weights["output.weight"] = model.head.weight.detach().float().cpu()
    return shape, weights


def _layer_tensors(block: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``name -> (weight, bias or None)`` of the block's projections under llama2.c's names (wq / wk / wv are
    the three row blocks of the fused qkv projection)."""
    linears = {"attention.wo": block.attn.proj, "feed_forward.w1": block.ff.gate}
    linears.update({"feed_forward.w2": block.ff.down, "feed_forward.w3": block.ff.up})
    tensors = {name: (linear.weight, linear.bias) for name, linear in linears.items()}
    qkv = block.attn.qkv
    biases = qkv.bias.chunk(3) if qkv.bias is not None else (None, None, None)
    for name, weight, bias in zip(
        ("attention.wq", "attention.wk", "attention.wv"), qkv.weight.chunk(3), biases, strict=True
    ):
        tensors[name] = (weight, bias)
    return tensors


def model_config(shape: LlamaShape) -> ModelConfig:
    """The project config of a Llama model of ``shape`` (SwiGLU's d_ff chosen so its hidden size is exact)."""
    d_ff = round(1.5 * shape.hidden_dim)
    if swiglu_hidden_size(d_ff) != shape.hidden_dim:  # pragma: no cover - round(1.5h) always maps back to h
        raise ConfigError(f"no model.d_ff gives a SwiGLU hidden size of {shape.hidden_dim}")
    if shape.dim % shape.n_heads or shape.n_heads % shape.n_kv_heads:
        raise ConfigError(
            f"dim {shape.dim}, n_heads {shape.n_heads}, n_kv_heads {shape.n_kv_heads}: the heads must divide dim and "
            "the key/value heads must divide the heads"
        )
    return ModelConfig(
        vocab_size=shape.vocab_size,
        context_length=shape.seq_len,
        d_model=shape.dim,
        n_layers=shape.n_layers,
        n_heads=shape.n_heads,
        d_ff=d_ff,
        dropout=0.0,
        bias=shape.bias,
        tie_embeddings=shape.tied,
        activation={"name": "swiglu", "multiple_of": 1},  # as conf/activation/swiglu.yaml writes it
        norm={"placement": "pre", "kind": "rmsnorm", "eps": shape.norm_eps, "affine": True},
        attention={"name": "sdpa"},
        positional={"name": "rope", "base": shape.rope_theta},
    ).validate()


def repeat_kv_rows(weight: torch.Tensor, n_kv_heads: int, n_heads: int) -> torch.Tensor:
    """Grouped-query k / v rows ``(n_kv_heads * head_dim, ...)`` as ``n_heads`` heads: each key/value head
    repeated for the query heads that share it (llama2.c's and Hugging Face's ``repeat_kv``)."""
    if n_kv_heads == n_heads:
        return weight
    head_dim = weight.shape[0] // n_kv_heads
    heads = weight.reshape(n_kv_heads, head_dim, *weight.shape[1:])
    return heads.repeat_interleave(n_heads // n_kv_heads, dim=0).reshape(n_heads * head_dim, *weight.shape[1:])


def llama_model(shape: LlamaShape, weights: LlamaWeights) -> DecoderTransformer:
    """The project model computing ``weights`` (rotate-half q / k rows; k / v of ``shape.n_kv_heads`` heads)."""
    model = DecoderTransformer(model_config(shape))
    state: dict[str, torch.Tensor] = {"embedding.table.weight": _get(weights, "tok_embeddings.weight")}
    for i in range(shape.n_layers):
        state.update(_block_state(shape, weights, i))
    state["final_norm.weight"] = _get(weights, "norm.weight")
    state["head.weight"] = _get(weights, "output.weight" if "output.weight" in weights else "tok_embeddings.weight")
    if shape.tied and not torch.equal(state["head.weight"], state["embedding.table.weight"]):
        raise ConfigError("the checkpoint says its output head is tied to the embedding, but the two differ")
    _load_exact(model, state)
    return model.eval()


def _block_state(shape: LlamaShape, weights: LlamaWeights, i: int) -> dict[str, torch.Tensor]:
    prefix, ours = f"layers.{i}.", f"blocks.{i}."

    def tensor(name: str, kind: str = "weight") -> torch.Tensor:
        value = _get(weights, f"{prefix}{name}.{kind}")
        if name in ("attention.wk", "attention.wv"):
            value = repeat_kv_rows(value, shape.n_kv_heads, shape.n_heads)
        return value

    state = {
        f"{ours}attn.qkv.weight": torch.cat([tensor(f"attention.w{p}") for p in "qkv"]),
        f"{ours}attn.proj.weight": tensor("attention.wo"),
        f"{ours}ff.gate.weight": tensor("feed_forward.w1"),
        f"{ours}ff.down.weight": tensor("feed_forward.w2"),
        f"{ours}ff.up.weight": tensor("feed_forward.w3"),
        f"{ours}norm_attn.weight": tensor("attention_norm"),
        f"{ours}norm_ff.weight": tensor("ffn_norm"),
    }
    if shape.bias:
        state[f"{ours}attn.qkv.bias"] = torch.cat([tensor(f"attention.w{p}", "bias") for p in "qkv"])
        state[f"{ours}attn.proj.bias"] = tensor("attention.wo", "bias")
        for mine, theirs in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
            state[f"{ours}ff.{mine}.bias"] = tensor(f"feed_forward.{theirs}", "bias")
    return state


def _get(weights: LlamaWeights, name: str) -> torch.Tensor:
    if name not in weights:
        raise ConfigError(f"the checkpoint has no tensor {name!r}: it is not a complete Llama model")
    return weights[name]


def _load_exact(model: DecoderTransformer, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``, every tensor with exactly the model's shape (a clear error otherwise)."""
    expected = model.state_dict()
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ConfigError(
                f"tensor {name} has shape {tuple(value.shape)}, the model built from the header needs "
                f"{tuple(expected[name].shape)}: the file's header and weights disagree"
            )
    missing = set(expected) - set(state)
    if missing:
        raise ConfigError(f"no weights for {', '.join(sorted(missing)[:3])}")
    model.load_state_dict({name: value.to(expected[name].dtype) for name, value in state.items()})


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q / k rows from the rotate-half layout (pairs ``(j, j + D/2)``) to llama2.c's interleaved one
    (pairs ``(2j, 2j + 1)``), per head."""
    rows, columns = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, columns).transpose(1, 2).reshape(rows, columns)


def rotate_half_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`interleave_rope_rows`: llama2.c's interleaved q / k rows in the rotate-half layout."""
    rows, columns = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, columns).transpose(1, 2).reshape(rows, columns)
