"""Export to and import from Hugging Face transformers: the exported folder, loaded by ``transformers`` alone,
computes the project model's logits (fp32, tight tolerance) and greedy tokens for the Llama and GPT-2 families,
tied and untied; its tokenizer encodes and decodes like the checkpoint's; models of either family built by
``transformers`` import with the same logits; and a model no HF class can hold is refused, writing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.interop.models import GPT2, LLAMA, VOCAB, bpe_tokenizer, checkpoint, language_model, story_texts
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.export import write_atomically, write_hf
from tiny_decoder.interop.hf import from_hf, to_hf
from tiny_decoder.model.generation import generate
from tiny_decoder.tasks import load_task

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

FAMILIES = {
    "llama": LLAMA,
    "llama_biased": {**LLAMA, "bias": True},  # attention_bias / mlp_bias
    "gpt2": GPT2,
    "gpt2_tanh_no_bias": {**GPT2, "activation": {"name": "gelu", "approximate": "tanh"}, "bias": False},
}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def exported(tmp_path: Path, task) -> Path:
    return write_atomically(tmp_path / "hf", lambda folder: write_hf(task, folder))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exported_folder_computes_the_same_logits_and_greedy_tokens(tmp_path, tokenizer, family, tied):
    task = language_model(tokenizer, **FAMILIES[family], tie_embeddings=tied)
    folder = exported(tmp_path, task)
    assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    expected_class = "LlamaForCausalLM" if family.startswith("llama") else "GPT2LMHeadModel"
    assert type(hf_model).__name__ == expected_class
    assert hf_model.config.tie_word_embeddings == tied
    ids = torch.randint(0, VOCAB, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = task.model(ids), hf_model(ids).logits
    assert ours.abs().max() > 1  # not a degenerate model
    torch.testing.assert_close(theirs, ours, atol=TOLERANCE, rtol=TOLERANCE)
    prompt = torch.tensor([task.encode_prompt("Once upon a time")])
    greedy = generate(task.model, prompt, 30, eos_id=task.eot_id)  # within the context: no cropping
    # the attention mask given: generate() would otherwise mask every token equal to the pad id
    hf_greedy = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False)
    assert hf_greedy.tolist() == greedy.tolist()


def test_exported_tokenizer_round_trips_text(tmp_path, tokenizer):
    task = language_model(tokenizer, **LLAMA)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported(tmp_path, task))
    assert type(hf_tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == task.eot_id
    for text in [*story_texts(30), "héllo wörld ☃ 123\n\ttabs", ""]:
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer.encode(text).ids
        assert hf_tokenizer.decode(ids) == tokenizer.decode(ids) == text


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "grouped_query"])
def test_llama_built_by_transformers_imports_with_its_logits(kv_heads):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=40, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=False,
    )  # fmt: skip
    hf_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model = from_hf(hf_model)
    assert model.config.positional == {"name": "rope", "base": 500.0} and model.config.norm["eps"] == 1e-6
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, atol=TOLERANCE, rtol=TOLERANCE)


def test_gpt2_built_by_transformers_imports_with_its_logits():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=40, n_embd=32, n_layer=2, n_head=4)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model = from_hf(hf_model)
    assert model.config.activation == {"name": "gelu", "approximate": "tanh"}  # GPT-2's gelu_new
    assert model.head.weight is model.embedding.weight
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, atol=TOLERANCE, rtol=TOLERANCE)


def test_convert_of_an_exported_folder_gives_back_the_checkpoint(tmp_path, tokenizer):
    source = checkpoint(tmp_path, tokenizer, **LLAMA)
    original = load_task(source)
    folder = exported(tmp_path, original)
    from tiny_decoder.convert import from_hf_folder, imported_task

    task = imported_task(*from_hf_folder(folder, None))
    ids = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        assert torch.equal(task.model(ids), original.model(ids))
    assert task.eot_id == original.eot_id and task.encode_prompt("Once") == original.encode_prompt("Once")


UNSUPPORTED = {
    "positional=alibi": {**LLAMA, "positional": {"name": "alibi"}},
    "attention=linformer": {**LLAMA, "attention": {"name": "linformer", "k": 8}},
    "attention=longformer": {**GPT2, "attention": {"name": "longformer", "window": 8}},
    "norm=post": {**GPT2, "norm": {"placement": "post", "kind": "layernorm", "eps": 1e-5, "affine": True}},
    "depth=early_exit": {**LLAMA, "depth": {"name": "early_exit", "threshold": 0.9}},
    "activation=relu": {**GPT2, "activation": {"name": "relu"}},
}


@pytest.mark.parametrize("part", UNSUPPORTED)
def test_a_model_without_an_hf_equivalent_fails_naming_the_part_and_writes_nothing(tmp_path, tokenizer, part):
    task = language_model(tokenizer, **UNSUPPORTED[part])
    with pytest.raises(ConfigError, match=f"it has {part}.*nothing was written"):
        exported(tmp_path, task)
    assert list(tmp_path.iterdir()) == []


def test_pruned_heads_are_refused(tokenizer):
    task = language_model(tokenizer, **LLAMA)
    task.model.layers[1].attn.keep_heads([0, 2])
    with pytest.raises(ConfigError, match=r"pruned attention heads \(layer 1 has 2 of 4\)"):
        to_hf(task.model)
