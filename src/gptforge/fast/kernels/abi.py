"""The C boundary, declared once: the ctypes mirrors of the C structs (gemv.h's `gf_lin`, block.c's
`gf_block` and `gf_model`), every exported function's argument types, and the check that the
compiled library lays the structs out as these mirrors do.

The mirrors are written by hand, so a field added on one side only would make C read the wrong
bytes. `check(lib)` compares the library's own report (`gf_abi`: a version, each struct's size and
each field's offset, as the C compiler laid them out) with what ctypes computes here; on any
difference the kernels are not used (the caller warns and runs PyTorch's path).
"""

from __future__ import annotations

import ctypes

# Bumped with any change to a struct or a function's arguments, on both sides (gemv.h's GF_ABI_VERSION).
ABI_VERSION = 3

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class Linear(ctypes.Structure):
    """gemv.h's gf_lin: one layer's weights as the C kernels read them."""

    _fields_ = [("fmt", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("w", ctypes.c_void_p),
                ("wp", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("ld", ctypes.c_int64)]


class Block(ctypes.Structure):
    """block.c's gf_block: a TransformerBlock's parameters."""

    _fields_ = [("d", ctypes.c_int64), ("heads", ctypes.c_int64), ("ln1_w", ctypes.c_void_p),
                ("ln1_b", ctypes.c_void_p), ("ln2_w", ctypes.c_void_p), ("ln2_b", ctypes.c_void_p),
                ("eps", ctypes.c_double), ("qkv", Linear), ("proj", Linear), ("fc1", Linear), ("fc2", Linear),
                ("q", Linear), ("k", Linear), ("v", Linear)]  # q, k, v: where qkv.w is NULL


class Model(ctypes.Structure):
    """block.c's gf_model: a whole GPTModel's decode step."""

    _fields_ = [("layers", ctypes.c_int64), ("d", ctypes.c_int64), ("vocab", ctypes.c_int64),
                ("positions", ctypes.c_int64), ("tok_emb", ctypes.c_void_p), ("pos_emb", ctypes.c_void_p),
                ("blocks", ctypes.c_void_p), ("lnf_w", ctypes.c_void_p), ("lnf_b", ctypes.c_void_p),
                ("eps", ctypes.c_double), ("head", Linear)]


STRUCTS = (Linear, Block, Model)  # in gf_abi's order

SIGNATURES = {
    "gf_linear": [_P, _P, _I64, _P, ctypes.c_int],  # layer, x, M, y, threads (gemv.h)
    "gf_block_decode": [_P, _P, _I64, _I64, _P, _P, _I64, _I64, _I64, _I64, _P, ctypes.c_int],  # see block.c
    "gf_dequantize": [_P, _I64, _P, ctypes.c_int, ctypes.c_int],  # layer, k_out, out, bf16, threads
    # fmt, W, its row and column strides, n, k, k padded, out, scale, threads
    "gf_quantize": [_I64, _P, _I64, _I64, _I64, _I64, _I64, _P, _P, ctypes.c_int],
    "gf_argmax": [_P, _I64, _I64, _I64, _P, ctypes.c_int],  # x, rows, n, row stride, out, threads
    # x, rows, n, row stride, mask, mask row stride, out, threads
    "gf_argmax_masked": [_P, _I64, _I64, _I64, _P, _I64, _P, ctypes.c_int],
    "gf_transpose": [_P, _I64, _I64, _I64, _P, ctypes.c_int],  # src, rows, cols, src row stride, dst, threads
    "gf_block_profile": [ctypes.c_int, _P],  # on, out (block.c)
    # model, tokens, positions, M, T, kc, vc, layer stride, row stride, max_len, start, kv format, mask, work,
    # logits, threads
    "gf_model_decode": [_P, _P, _P, _I64, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, ctypes.c_int],
    "gf_abi": [_P, _I64],  # out, capacity
    "gf_failed": [],
}
# What each returns: an int (gf_model_decode: 1 where an id is out of range; gf_abi: how many values it
# wrote; gf_failed: whether an allocation failed since the last call, which it clears); the others nothing.
RETURNS_INT = ("gf_model_decode", "gf_abi", "gf_failed")


def expected_layout() -> list[int]:
    """What `gf_abi` writes when the library matches these mirrors: the version, then for each
    struct its size and each field's offset, in bytes."""
    out = [ABI_VERSION]
    for struct in STRUCTS:
        out.append(ctypes.sizeof(struct))
        out.extend(getattr(struct, name).offset for name, _ in struct._fields_)
    return out


def reported_layout(lib: ctypes.CDLL) -> list[int] | None:
    """The layout the compiled library reports, or None where it has no `gf_abi` (an older build)."""
    if not hasattr(lib, "gf_abi"):
        return None
    capacity = 64
    buffer = (ctypes.c_int64 * capacity)()
    count = lib.gf_abi(buffer, capacity)
    return list(buffer[:min(count, capacity)])


def mismatch(lib: ctypes.CDLL) -> str | None:
    """None where the library's structs and version are those declared here, else what differs."""
    reported, expected = reported_layout(lib), expected_layout()
    if reported is None:
        return "the library reports no layout (gf_abi missing)"
    if reported[:1] != expected[:1]:
        return f"version {reported[:1]} where {ABI_VERSION} is expected"
    if reported != expected:
        return f"struct sizes/offsets {reported} where {expected} are expected"
    return None
