"""The project's decoder as a Hugging Face model and back: ``LlamaForCausalLM`` for Llama-style models
(pre-RMSNorm, SwiGLU, RoPE), ``GPT2LMHeadModel`` for GPT-2-style ones (pre-LayerNorm, GELU, learned
positions). :func:`to_hf` builds the ``transformers`` model holding exactly this model's function (checked by
``families.check_family``: anything else fails naming the part); :func:`from_hf` builds the project model of a
loaded Hugging Face model of either family. ``transformers`` is the ``hf`` extra, imported when used.
"""

from __future__ import annotations

from typing import Any

import torch

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.interop.families import check_family, family_of
from tiny_decoder.interop.llama import LlamaShape, llama_model, llama_weights
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.transformer import DecoderTransformer

HF_EXTRA = 'the Hugging Face formats need the hf extra: pip install -e ".[hf]" (transformers, safetensors)'

# llama2.c names (interop/llama.py) -> Hugging Face LlamaForCausalLM names, per layer and global
LLAMA_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
LLAMA_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
LLAMA_NAMES["output.weight"] = "lm_head.weight"
GELU_OF_APPROXIMATION = {"none": "gelu", "tanh": "gelu_new"}  # our nn.GELU(approximate) -> HF activation_function


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ConfigError(HF_EXTRA) from error
    transformers.utils.logging.disable_progress_bar()  # one line per tool run, not a bar per weight file
    return transformers


# ------------------------------------------------------------------ export


def to_hf(model: DecoderTransformer, eot_id: int | None = None) -> Any:
    """A ``transformers`` model (fp32, eval mode) computing exactly what ``model`` computes; ``eot_id`` (the
    end-of-text token) becomes its BOS and EOS id, so ``generate()`` stops where this project's does."""
    family = family_of(model)
    check_family(model, family, "a Hugging Face model")
    special = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": None}
    hf_model = _llama_to_hf(model, special) if family == "llama" else _gpt2_to_hf(model, special)
    return hf_model.eval()


def _llama_to_hf(model: DecoderTransformer, special: dict[str, Any]) -> Any:
    shape, weights = llama_weights(model, "a Hugging Face LlamaForCausalLM")
    transformers = transformers_module()
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.dim,
        intermediate_size=shape.hidden_dim,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        max_position_embeddings=shape.seq_len,
        rms_norm_eps=shape.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        tie_word_embeddings=shape.tied,
        attention_bias=shape.bias,
        mlp_bias=shape.bias,
        attention_dropout=_attention_dropout(model.config),
        architectures=["LlamaForCausalLM"],
        **special,
    )
    hf_model = transformers.LlamaForCausalLM(config)
    _load_state(hf_model, {_llama_hf_name(name): value for name, value in weights.items()})
    return hf_model


def _llama_hf_name(name: str) -> str:
    if name in LLAMA_NAMES:
        return LLAMA_NAMES[name]
    _, index, rest = name.split(".", 2)
    part, kind = rest.rsplit(".", 1)
    return f"model.layers.{index}.{LLAMA_LAYER_NAMES[part]}.{kind}"


def _attention_dropout(config: ModelConfig) -> float:
    return config.dropout if config.attention_dropout is None else config.attention_dropout


def _gpt2_to_hf(model: DecoderTransformer, special: dict[str, Any]) -> Any:
    config = model.config
    transformers = transformers_module()
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.d_ff,
        activation_function=GELU_OF_APPROXIMATION[config.activation.get("approximate", "none")],
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=_attention_dropout(config),
        layer_norm_epsilon=float(config.norm["eps"]),
        tie_word_embeddings=model.head.weight is model.embedding.weight,
        architectures=["GPT2LMHeadModel"],
        **special,
    )
    hf_model = transformers.GPT2LMHeadModel(hf_config)
    _load_state(hf_model, gpt2_state(model))
    return hf_model


def _linear_state(prefix: str, linear: torch.nn.Linear) -> dict[str, torch.Tensor]:
    """A Linear as GPT-2's Conv1D (weight transposed: ``(in, out)``); no bias: zeros (the same function)."""
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
    return {f"{prefix}.weight": linear.weight.detach().t(), f"{prefix}.bias": bias.detach()}


def _layer_norm_state(prefix: str, norm: torch.nn.Module, dim: int) -> dict[str, torch.Tensor]:
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    return {
        f"{prefix}.weight": torch.ones(dim) if weight is None else weight.detach(),
        f"{prefix}.bias": torch.zeros(dim) if bias is None else bias.detach(),
    }


def gpt2_state(model: DecoderTransformer) -> dict[str, torch.Tensor]:
    """``model``'s tensors under GPT2LMHeadModel's names."""
    dim = model.config.d_model
    state = {
        "transformer.wte.weight": model.embedding.weight.detach(),
        "transformer.wpe.weight": model.positional.table.weight.detach(),
        "lm_head.weight": model.head.weight.detach(),
    }
    blocks: list[Any] = list(model.layers)
    for i, block in enumerate(blocks):
        prefix = f"transformer.h.{i}"
        state.update(_linear_state(f"{prefix}.attn.c_attn", block.attn.qkv))
        state.update(_linear_state(f"{prefix}.attn.c_proj", block.attn.proj))
        state.update(_linear_state(f"{prefix}.mlp.c_fc", block.ff.up))
        state.update(_linear_state(f"{prefix}.mlp.c_proj", block.ff.down))
        state.update(_layer_norm_state(f"{prefix}.ln_1", block.norm_attn, dim))
        state.update(_layer_norm_state(f"{prefix}.ln_2", block.norm_ff, dim))
    state.update(_layer_norm_state("transformer.ln_f", model.final_norm, dim))
    return {name: value.float().contiguous() for name, value in state.items()}


def _load_state(hf_model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``hf_model``: every parameter covered (tied ones by their source), nothing left over."""
    expected = hf_model.state_dict()
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ConfigError(f"internal: tensors {unknown[:3]} have no place in {type(hf_model).__name__}")
    missing = sorted(name for name in expected if name not in state and not _is_tied(hf_model, name))
    if missing:
        raise ConfigError(f"internal: no weights for {missing[:3]} of {type(hf_model).__name__}")
    with torch.no_grad():
        for name, value in state.items():
            if name == "lm_head.weight" and hf_model.config.tie_word_embeddings:
                continue
            expected[name].copy_(value)


def _is_tied(hf_model: Any, name: str) -> bool:
    return name == "lm_head.weight" and bool(hf_model.config.tie_word_embeddings)


# ------------------------------------------------------------------ import


def from_hf(hf_model: Any) -> DecoderTransformer:
    """The project model computing what a loaded ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` computes."""
    model_type = getattr(hf_model.config, "model_type", None)
    importers = {"llama": _llama_from_hf, "gpt2": _gpt2_from_hf}
    if model_type not in importers:
        raise ConfigError(
            f"a Hugging Face {model_type!r} model: only the llama (LlamaForCausalLM) and gpt2 (GPT2LMHeadModel) "
            "families can be imported"
        )
    return importers[model_type](hf_model)


def _llama_from_hf(hf_model: Any) -> DecoderTransformer:
    config = hf_model.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_parameters.rope_type={rope['rope_type']}: only the default RoPE can be imported")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ConfigError(
            f"head_dim={head_dim} x {config.num_attention_heads} heads != hidden_size={config.hidden_size}"
        )
    if config.attention_bias != config.mlp_bias:
        raise ConfigError("attention_bias and mlp_bias differ: this project has one model.bias for both")
    if config.hidden_act != "silu":
        raise ConfigError(f"hidden_act={config.hidden_act}: only SwiGLU (silu) Llama models can be imported")
    shape = LlamaShape(
        dim=config.hidden_size,
        hidden_dim=config.intermediate_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        vocab_size=config.vocab_size,
        seq_len=config.max_position_embeddings,
        tied=bool(config.tie_word_embeddings),
        norm_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        bias=bool(config.attention_bias),
    )
    state = {name: value.detach().float() for name, value in hf_model.state_dict().items()}
    ours = {name: state[hf] for name, hf in _llama_names(shape).items() if hf in state}
    return llama_model(shape, ours)


def _llama_names(shape: LlamaShape) -> dict[str, str]:
    """llama2.c name -> Hugging Face name of every tensor a model of ``shape`` has."""
    names = dict(LLAMA_NAMES)
    kinds = ("weight", "bias") if shape.bias else ("weight",)
    for i in range(shape.n_layers):
        for part in LLAMA_LAYER_NAMES:
            for kind in ("weight",) if part.endswith("norm") else kinds:
                names[f"layers.{i}.{part}.{kind}"] = _llama_hf_name(f"layers.{i}.{part}.{kind}")
    return names


def _gpt2_from_hf(hf_model: Any) -> DecoderTransformer:
    config = hf_model.config
    approximation = {value: key for key, value in GELU_OF_APPROXIMATION.items()}
    approximation["gelu_pytorch_tanh"] = "tanh"
    if config.activation_function not in approximation:
        raise ConfigError(f"activation_function={config.activation_function}: only gelu / gelu_new can be imported")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(config, flag, False):
            raise ConfigError(f"{flag}=true: this project's attention has no such option")
    if not getattr(config, "scale_attn_weights", True):
        raise ConfigError("scale_attn_weights=false: this project's attention always scales by 1/sqrt(head_dim)")
    tied = bool(config.tie_word_embeddings)
    model = DecoderTransformer(
        ModelConfig(
            vocab_size=config.vocab_size,
            context_length=config.n_positions,
            d_model=config.n_embd,
            n_layers=config.n_layer,
            n_heads=config.n_head,
            d_ff=config.n_inner or 4 * config.n_embd,
            dropout=0.0,
            bias=True,
            tie_embeddings=tied,
            activation={"name": "gelu", "approximate": approximation[config.activation_function]},
            norm={"placement": "pre", "kind": "layernorm", "eps": float(config.layer_norm_epsilon), "affine": True},
            attention={"name": "sdpa"},
            positional={"name": "learned"},
        ).validate()
    )
    theirs = hf_model.state_dict()
    ours = {name: theirs[hf].detach().float() for name, hf in _gpt2_names(model).items()}
    ours = {name: value.t() if _is_conv1d(name) else value for name, value in ours.items()}
    if tied:
        ours["head.weight"] = ours["embedding.table.weight"]
    model.load_state_dict(ours)
    return model.eval()


def _gpt2_names(model: DecoderTransformer) -> dict[str, str]:
    """Our state-dict name -> GPT2LMHeadModel's, for every tensor (the head only when untied)."""
    names = {"embedding.table.weight": "transformer.wte.weight", "positional.table.weight": "transformer.wpe.weight"}
    names["final_norm.weight"], names["final_norm.bias"] = "transformer.ln_f.weight", "transformer.ln_f.bias"
    if model.head.weight is not model.embedding.weight:
        names["head.weight"] = "lm_head.weight"
    parts = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ff.up": "mlp.c_fc", "ff.down": "mlp.c_proj"}
    parts.update({"norm_attn": "ln_1", "norm_ff": "ln_2"})
    for i in range(model.config.n_layers):
        for mine, theirs in parts.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{mine}.{kind}"] = f"transformer.h.{i}.{theirs}.{kind}"
    return names


def _is_conv1d(name: str) -> bool:
    return name.endswith(".weight") and any(part in name for part in ("attn.qkv", "attn.proj", "ff.up", "ff.down"))
