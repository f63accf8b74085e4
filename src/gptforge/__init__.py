"""gptforge: GPT-2 from scratch in PyTorch, readable like the book and usable like a tool."""

from .checkpoint import load, load_training_state, save
from .config import PRESETS, GPTConfig, preset
from .generation import generate_text, generate_text_simple
from .model import (
    GELU, FeedForward, GPTModel, KVCache, LayerNorm, MultiHeadAttention, ParameterCounts,
    TransformerBlock, count_parameters,
)
from .tokenizer import Tokenizer, get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "GELU", "FeedForward", "GPTConfig", "GPTModel", "KVCache", "LayerNorm", "MultiHeadAttention",
    "PRESETS", "ParameterCounts", "Tokenizer", "TransformerBlock", "count_parameters",
    "generate_text", "generate_text_simple", "get_tokenizer", "load", "load_training_state", "preset", "save",
]
