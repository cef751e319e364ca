"""A SentencePiece BPE model (llama2.c's ``tokenizer.model`` / ``tok512.model``, Llama 2's) as a ``tokenizers``
``Tokenizer`` that encodes and decodes exactly as ``sentencepiece`` does, so an imported model's checkpoint
carries a tokenizer like every other (``tokenizer_json``) and the project's tools decode its text.

The pieces, scores and normalizer flags come from the ``sentencepiece`` package (the ``hf`` extra); the
merges are ordered by the merged piece's score (``transformers``' ``generate_merges``, what SentencePiece's
BPE applies); the pipeline is SentencePiece's: optional removal of extra spaces, the dummy ``▁`` prefix,
spaces as ``▁``, byte fallback (``<0xNN>`` pieces) and, decoding, the reverse. Control pieces (``<s>``,
``</s>``) are in the vocabulary but, as in SentencePiece, never matched in text; decoding writes them out
(SentencePiece drops them), which the language model never meets: it cuts a continuation at its end token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

from tiny_decoder.core.errors import ConfigError

SPM_EXTRA = 'SentencePiece tokenizers need the hf extra: pip install -e ".[hf]" (sentencepiece, transformers)'
SPACE = "▁"
BPE_MODEL_TYPE = 2  # sentencepiece_model.proto: TrainerSpec.ModelType.BPE
CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # ModelProto.SentencePiece.Type


def _modules() -> tuple[Any, Any, Any]:
    try:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2
        from transformers.convert_slow_tokenizer import generate_merges
    except ImportError as error:
        raise ConfigError(SPM_EXTRA) from error
    return sentencepiece, sentencepiece_model_pb2, generate_merges


def read_proto(path: str | Path) -> Any:
    """The ``ModelProto`` of a SentencePiece ``.model`` file; a clear error for anything else."""
    _, model_pb2, _ = _modules()
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as error:  # protobuf's DecodeError and friends
        raise ConfigError(f"tokenizer={path}: not a SentencePiece .model file ({type(error).__name__})") from error
    if not proto.pieces:
        raise ConfigError(f"tokenizer={path}: not a SentencePiece .model file (no pieces)")
    return proto


def sentencepiece_tokenizer(path: str | Path) -> Tokenizer:
    """The ``tokenizers`` equivalent of the SentencePiece BPE model at ``path``."""
    if not Path(path).is_file():
        raise ConfigError(f"tokenizer={path}: no such file")
    proto = read_proto(path)
    if proto.trainer_spec.model_type != BPE_MODEL_TYPE:
        raise ConfigError(
            f"tokenizer={path}: a SentencePiece unigram model; only BPE models (llama2.c's) are supported"
        )
    _, _, generate_merges = _modules()
    pieces = [(piece.piece, piece.score, piece.type) for piece in proto.pieces]
    vocab = {piece: index for index, (piece, _, _) in enumerate(pieces)}
    user_defined = [piece for piece, _, kind in pieces if kind == USER_DEFINED]  # matched in text, as by sentencepiece
    skip = {piece for piece, _, kind in pieces if kind in (CONTROL, BYTE)}
    scores = {piece: score for piece, score, _ in pieces}
    merges = generate_merges(vocab, scores, skip_tokens=skip)
    unk = proto.trainer_spec.unk_piece or "<unk>"
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.add_tokens([AddedToken(piece, normalized=False) for piece in user_defined])
    tokenizer.normalizer = _normalizer(proto.normalizer_spec)
    tokenizer.decoder = _decoder(proto.normalizer_spec)
    return tokenizer


def _normalizer(spec: Any) -> normalizers.Normalizer:
    steps: list[normalizers.Normalizer] = []
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _decoder(spec: Any) -> decoders.Decoder:
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def special_piece(path: str | Path, which: str) -> str:
    """The piece of the ``bos`` / ``eos`` / ``unk`` token of a SentencePiece model."""
    proto = read_proto(path)
    index = getattr(proto.trainer_spec, f"{which}_id")
    if index < 0:
        raise ConfigError(f"tokenizer={path}: the SentencePiece model has no {which} token")
    return str(proto.pieces[index].piece)
