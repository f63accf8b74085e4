"""gptforge: GPT-2 from scratch in PyTorch, readable like the book and usable like a tool.

What users call is here: the book's classes, GPTConfig and its presets, load/save, the generation
functions, embed, train/TrainConfig, dpo_loss, prepare_for_inference, perplexity/classification_report and the tokenizer. Helpers stay importable
from their modules (`gptforge.generation.left_pad`, `gptforge.checkpoint.detect_format`, ...)."""

from .checkpoint import load, load_training_state, save
from .classifier import classify
from .config import PRESETS, GPTConfig, preset
from .dpo import dpo_loss
from .embeddings import embed
from .errors import GptforgeError
from .evaluate import ClassificationReport, Perplexity, classification_report, perplexity
from .generation import (
    GenerationConfig, TextStream, generate, generate_text, generate_text_simple, left_pad, next_tokens,
    stream_text,
)
from .model import (
    GELU, FeedForward, GPTModel, KVCache, LayerNorm, MultiHeadAttention, ParameterCounts,
    TransformerBlock, count_parameters,
)
from .fast import prepare_for_inference
from .tokenizer import Tokenizer, get_tokenizer
# train adds ~30 ms to `import gptforge` (about 1% of torch's import), so it is imported eagerly.
from .train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "ClassificationReport", "GELU", "FeedForward", "GPTConfig", "GPTModel", "GenerationConfig", "GptforgeError",
    "KVCache", "LayerNorm", "MultiHeadAttention", "PRESETS", "ParameterCounts", "Perplexity", "TextStream",
    "Tokenizer", "TrainConfig", "TransformerBlock", "classification_report", "classify", "count_parameters", "dpo_loss",
    "embed", "generate", "generate_text", "generate_text_simple", "get_tokenizer", "left_pad", "load", "load_training_state",
    "next_tokens", "perplexity", "prepare_for_inference", "preset", "save", "stream_text", "train",
]
