"""gptforge: GPT-2 from scratch in PyTorch, readable like the book and usable like a tool."""

from .checkpoint import load, load_training_state, save
from .config import PRESETS, GPTConfig, preset
from .evaluate import ClassificationReport, Perplexity, classification_report, perplexity
from .generation import (
    GenerationConfig, TextStream, generate, generate_text, generate_text_simple, left_pad, next_tokens,
    stream_text,
)
from .model import (
    GELU, FeedForward, GPTModel, KVCache, LayerNorm, MultiHeadAttention, ParameterCounts,
    TransformerBlock, count_parameters,
)
from .tokenizer import Tokenizer, get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "GELU", "FeedForward", "GPTConfig", "GPTModel", "KVCache", "LayerNorm", "MultiHeadAttention",
    "GenerationConfig", "PRESETS", "ParameterCounts", "TextStream", "Tokenizer", "TransformerBlock",
    "count_parameters", "generate", "generate_text", "generate_text_simple", "get_tokenizer", "left_pad",
    "load", "load_training_state", "next_tokens", "preset", "save", "stream_text",
    "ClassificationReport", "Perplexity", "classification_report", "perplexity",
]
