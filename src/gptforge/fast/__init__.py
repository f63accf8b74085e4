"""gptforge's fast path: everything that makes inference faster than the book's model, behind one
boundary. `model.py` and `generation.py` stay the readable path; this package only lays a model
out anew and swaps its layers for ones that compute the same function faster.

    policy.py    the per-CPU choices (`choose_mode`): a pure function of the CPU's feature flags
    linears.py   the linear layers: float32 on gptforge's kernels, weight-only bf16 / int8 / 4-bit
    blocks.py    a TransformerBlock and a whole GPTModel whose decode step is one C call
    prepare.py   `prepare_for_inference`: a model prepared in place
    view.py      `inference_view`: the float32 layout beside a model, on the model's own weights
    kernels/     the C kernels and their ctypes bindings (compiled once per CPU)

`prepare_for_inference(model, dtype, quantize)` turns a trained or random GPTModel into an
inference model, in place, and returns it:

- float32: every nn.Linear becomes a `Float32Linear` (same parameters, keys and tensors: no weight
  is copied, query, key and value stay three products).
  A decode step's few rows go through gptforge's own kernel (`gptforge.fast.kernels`, which streams
  each weight once: PyTorch's reads them at about half the memory bandwidth; a batch's decode
  steps through a second copy of the weights in the kernels' panel order, made on first use), and
  a short prefill's products too (`choose_mode`'s rows); a long prefill and a training step through
  PyTorch.
- bfloat16: the model's weights are rounded to bf16. Where gptforge's kernels run (CPU), every
  nn.Linear (query/key/value fused) becomes a `Bf16Linear`: bf16 weights in the kernels' panel
  order, float32 activations and sums, half float32's bytes to stream at a decode step; the rest
  of the model (embeddings, norms) holds its bf16 values as float32, and decoding runs on the
  kernels as float32's does. Elsewhere the model is cast to bf16 and every nn.Linear becomes a
  `PackedLinear`, whose weight is pre-packed once in oneDNN's blocked layout (query/key/value
  one packed matrix, the feed-forward's GELU fused into its first matmul).
- int8 (weight-only): every nn.Linear (query/key/value fused) becomes an `Int8Linear` with
  per-output-channel symmetric int8 weights.
- int4 (weight-only): every nn.Linear becomes an `Int4Linear`: groups of 32 weights with one scale
  each, llama.cpp's Q4_0 scheme.
  For int8 and int4, a decode step's rows go through gptforge's integer kernels (activations
  quantized per block of 32 as llama.cpp's Q8_0, float32 in and out; the weights stored in the
  kernels' panel order, the KV cache as Q8_0 rows) where this CPU has them, else through PyTorch's
  weight-only kernels (bf16 activations, weights row by row). A prefill's products go through the
  same kernels too (64 rows at a time), except on a CPU with AMX, where one of more than 64 rows
  dequantizes the weights to bf16 for one matmul, as every prefill does without the kernels (to
  this CPU's fastest dense dtype: `choose_mode`).

Prepare a model last: moving or casting it afterwards (`.to(...)`) is not supported.

Packed, int8 and int4 models are for inference only (no autograd through the weights).

`inference_view(model)` is the float32 layout without touching `model`, reading `model`'s own
weights (no copy): what `generate`, `generate_text` and `stream_text` decode with by default.

`choose_mode(dtype, quantize, flags)` is the one table of per-CPU choices (what `dtype="auto"`
resolves to, how many rows of a float32 or quantized product gptforge's kernels take, and which
dtype a quantized prefill dequantizes to beyond that), a pure function of the CPU's
feature flags so that it can be tested for CPUs other than the one at hand.
"""

from .policy import DTYPES, QUANTIZATIONS, InferenceMode, choose_mode, parse_dtype
from .prepare import prepare_for_inference
from .view import inference_view

__all__ = ["DTYPES", "QUANTIZATIONS", "InferenceMode", "choose_mode", "inference_view", "parse_dtype",
           "prepare_for_inference"]
