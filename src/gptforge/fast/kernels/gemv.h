/* gemv.c's interface to the other kernels: one linear layer, in any of the four weight formats. */
#ifndef GPTFORGE_GEMV_H
#define GPTFORGE_GEMV_H
#include <stdint.h>

/* Bumped with any change to a struct or a function's arguments, on both sides (kernels/abi.py's ABI_VERSION). */
#define GF_ABI_VERSION 3

enum format { F32 = 0, I8 = 1, Q4 = 2, BF16 = 3 };

/* W (n, k) in `fmt` (see gemv.c): `w` (float32: row-major or NULL; int8, 4-bit, bf16: in panels),
 * float32's panels `wp` or NULL, the scales (int8: (n,), 4-bit: in panels), the bias (n,) or NULL,
 * and `ld`: 0 where float32's `wp` are packed panels, else the row stride of the (k, ld) row-major
 * matrix whose first n columns are W^T, read in place (a Hugging Face Conv1D weight) */
typedef struct {
    int64_t fmt, n, k;
    const void *w;
    const float *wp, *scale, *bias;
    int64_t ld;
} gf_lin;

/* y (M, n) = x (M, k) @ W^T + bias */
void gf_linear(const gf_lin *L, const float *x, int64_t M, float *y, int threads);

/* An allocation failed: the call that found it did no (or part of its) work, and gf_failed() says so
 * to the caller (kernels/__init__.py's `call` checks it after every call and raises MemoryError). */
void gf_fail(void);
int gf_failed(void);

#endif
