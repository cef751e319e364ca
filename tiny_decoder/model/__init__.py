"""The model core in plain ``torch.nn`` (no Lightning): config, parts and the decoder transformer.

Importing this package imports every part module, so each part's registry is complete.
"""

from tiny_decoder.model import attention, depth, efficient_attention, embedding, feedforward, norm, positional  # noqa: F401
from tiny_decoder.model.cache import KVCache
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.transformer import DecoderTransformer

__all__ = ["DecoderTransformer", "KVCache", "ModelConfig"]
