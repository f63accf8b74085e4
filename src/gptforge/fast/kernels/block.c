/* One decode step of a TransformerBlock, whole, in one call: what model.py's
 *
 *     x = x + out_proj(attention(W_qkv(norm1(x)), with the KV cache))
 *     x = x + fc2(gelu(fc1(norm2(x))))
 *
 * computes for T new tokens in each of M sequences (M T rows: T = 1 at a decode step, more for a
 * short prefill), their keys and values written into the cache at positions [start, start + T). Between the matrix products of a decode step PyTorch spends
 * about as long dispatching ~20 small operators per block as the 4-bit products take; here they
 * are a few loops. The products are gemv.c's (any weight format, one per layer).
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gemv.h"
#include "simd.h"

/* A TransformerBlock's parameters (built by gptforge/kernels/block.py) */
typedef struct {
    int64_t d, heads;
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    double eps;
    gf_lin qkv, proj, fc1, fc2;  /* qkv: (3 d, d), query then key then value */
    gf_lin q, k, v;              /* where qkv.w is NULL: the three (d, d) projections apart */
} gf_block;

/* y = (x - mean) / sqrt(var + eps) * w + b per row of d values (biased variance, as the book's;
 * two passes, float32 vector sums as PyTorch's). d a whole number of vectors. */
static void layer_norm(const float *x, int64_t M, int64_t d, const float *w, const float *b, double eps,
                       float *y) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * d;
        vec sum = vzero(), sq = vzero();
        for (int64_t i = 0; i < d; i += VL) sum = sum + vload(xm + i);
        const vec mean = vset1(vsum(sum) / (float)d);
        for (int64_t i = 0; i < d; i += VL) {
            const vec c = vload(xm + i) - mean;
            sq = vfma(c, c, sq);
        }
        const vec inv = vset1((float)(1.0 / sqrt((double)vsum(sq) / d + eps)));
        for (int64_t i = 0; i < d; i += VL)
            vstore(y + m * d + i, vfma((vload(xm + i) - mean) * inv, vload(w + i), vload(b + i)));
    }
}

/* GELU, tanh approximation (GPT-2's): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), in place;
 * tanh(u) = 1 - 2 / (exp(2u) + 1) */
static void gelu(float *x, int64_t n, int threads) {
    const float c = 0.7978845608028654f;
    const int64_t whole = n / VL * VL;
    #pragma omp parallel for num_threads(threads) schedule(static) if (n >= 8192)
    for (int64_t i = 0; i < whole; i += VL) {
        const vec v = vload(x + i);
        const vec u = v * vfma(v * v, vset1(0.044715f * c), vset1(c));
        const vec t = vset1(1.f) - vset1(2.f) / (vexp(u + u) + vset1(1.f));
        vstore(x + i, vset1(0.5f) * v * (vset1(1.f) + t));
    }
    for (int64_t i = whole; i < n; i++) x[i] = 0.5f * x[i] * (1.f + tanhf(c * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
}

/* p[0..n) = exp(p - max p), returning their sum */
static float softmax_numerators(float *p, int64_t n) {
    const int64_t whole = n / VL * VL;
    vec most = vset1(-INFINITY);
    for (int64_t i = 0; i < whole; i += VL) most = vmax(most, vload(p + i));
    float top = whole ? vmaxall(most) : -INFINITY;
    for (int64_t i = whole; i < n; i++) top = p[i] > top ? p[i] : top;
    vec acc = vset1(0.f);
    for (int64_t i = 0; i < whole; i += VL) {
        const vec e = vexp(vload(p + i) - vset1(top));
        vstore(p + i, e);
        acc = acc + e;
    }
    float sum = 0.f;
    for (int64_t i = whole; i < n; i++) sum += p[i] = expf(p[i] - top);
    return sum + vsum(acc);
}

#define ATT_AHEAD 8   /* cached keys and values prefetched this many positions ahead */
#define MAX_HEAD 256  /* the largest head size the C block runs (block.py checks) */

/* The KV cache's formats (block.py's KV_FORMATS): float32, half precision (IEEE fp16, F16C's
 * conversions), and Q8_0 rows: a head's hs values at a position as hs int8 q then hs / 32 fp16
 * scales d, one per block of 32 (model.py's q8_0_rows). */
enum { KV_F32 = 0, KV_F16 = 1, KV_Q8 = 2 };

static inline int64_t kv_row_elements(int kv, int64_t hs) { return kv == KV_Q8 ? hs + hs / 16 : hs; }
static inline int64_t kv_element_size(int kv) { return kv == KV_F32 ? 4 : kv == KV_F16 ? 2 : 1; }

/* Values [i, i + VL) of a cached key or value row (i a multiple of VL, VL divides 32) */
static inline vec kv_load(const char *row, int64_t i, const int kv, const int64_t hs) {
    if (kv == KV_Q8)
        return vload_i8((const int8_t *)row + i) * vset1(_cvtsh_ss(((const uint16_t *)(row + hs))[i / 32]));
    return kv == KV_F16 ? vload_half((const uint16_t *)row + i) : vload((const float *)row + i);
}

/* x (hs floats) into a cache row in format kv */
static inline void kv_store(char *row, const float *x, const int kv, const int64_t hs) {
    if (kv == KV_F32) {
        memcpy(row, x, sizeof(float) * hs);
    } else if (kv == KV_F16) {
        for (int64_t i = 0; i < hs; i += VL) vstore_half((uint16_t *)row + i, vload(x + i));
    } else {
        for (int64_t b = 0; b < hs / 32; b++) {
            const float d = q8_0_block(x + 32 * b, (int8_t *)row + 32 * b, NULL);
            ((uint16_t *)(row + hs))[b] = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
    }
}

/* Causal attention of query r (token t = r % T of sequence b = r / T, at position start + t), head
 * h, over the S = start + t + 1 cached keys up to its own (those `mask` allows, and always its own:
 * mask (M, start + T) bytes, or NULL for all): scaled dot products and softmax, as model.py's
 * F.scaled_dot_product_attention with _attention_mask. qkv (M T, 3 d); k, v: sequence b, head h,
 * position s at element b * row_stride + (h * max_len + s) * kv_row_elements of kc / vc, in format
 * `kv`; ctx (M T, d).
 * Called with a literal head size `hs` where it is GPT-2's 64, so that the loops over a head's
 * values unroll and their sums stay in registers. Scores are taken VL positions at a time (their
 * sums across vectors in one tree, vsums); the values are summed in two interleaved sets.
 * At a batch's step the cache comes from memory (the weights streamed since the last step evict
 * it), so while the keys are read the values are prefetched, and while the values are read the
 * keys of the head this thread does next (ATT_AHEAD's prefetch serves a thread's first head). */
static inline __attribute__((always_inline)) void attend(
        const int kv, const int64_t hs, int64_t r, int64_t h, int64_t M, int64_t T, const float *qkv, int64_t d,
        int64_t heads, const void *kc, const void *vc, int64_t row_stride, int64_t max_len, int64_t start,
        const uint8_t *mask, float *p, float *ctx) {
    const int64_t size = kv_element_size(kv), elements = kv_row_elements(kv, hs), row = elements * size;
    const int64_t b = r / T, S = start + r % T + 1, width = start + T;
    const int64_t first = b * row_stride + h * max_len * elements;
    const int64_t next_r = h + 1 < heads ? r : r + 1, next_h = h + 1 < heads ? h + 1 : 0;  /* this thread's next */
    const char *next_k = next_r < M * T ? (const char *)kc + (next_r / T * row_stride + next_h * max_len * elements) * size : NULL;
    const float scale = 1.f / sqrtf((float)hs);
    const float *q = qkv + r * 3 * d + h * hs;
    const char *k = (const char *)kc + first * size, *v = (const char *)vc + first * size;
    float *out = ctx + r * d + h * hs;
    vec qv[MAX_HEAD / VL];
    for (int64_t i = 0; i < hs / VL; i++) qv[i] = vload(q + i * VL);
    int64_t s = 0;
    for (; s + VL <= S; s += VL) {
        vec part[VL];
        _Pragma("GCC unroll 16")
        for (int j = 0; j < VL; j++) {
            for (int64_t i = 0; i < row; i += 64) {
                __builtin_prefetch(k + (s + j + ATT_AHEAD) * row + i, 0, 2);
                __builtin_prefetch(v + (s + j) * row + i, 0, 2);
            }
            vec acc = vzero();
            for (int64_t i = 0; i < hs / VL; i++) acc = vfma(qv[i], kv_load(k + (s + j) * row, i * VL, kv, hs), acc);
            part[j] = acc;
        }
        vstore(p + s, vsums(part) * vset1(scale));
    }
    for (; s < S; s++) {
        for (int64_t i = 0; i < row; i += 64) __builtin_prefetch(v + s * row + i, 0, 2);
        vec acc = vzero();
        for (int64_t i = 0; i < hs / VL; i++) acc = vfma(qv[i], kv_load(k + s * row, i * VL, kv, hs), acc);
        p[s] = vsum(acc) * scale;
    }
    if (mask)
        for (s = 0; s + 1 < S; s++)
            if (!mask[b * width + s]) p[s] = -INFINITY;
    const float inv = 1.f / softmax_numerators(p, S);
    vec even[MAX_HEAD / VL], odd[MAX_HEAD / VL];  /* positions 0, 2, 4, ... and 1, 3, 5, ... */
    for (int64_t i = 0; i < hs / VL; i++) even[i] = odd[i] = vzero();
    for (s = 0; s + 2 <= S; s += 2) {  /* the values in order, two rows at a time */
        if (next_k)
            for (int64_t i = 0; i < 2 * row; i += 64) __builtin_prefetch(next_k + s * row + i, 0, 2);
        const vec p0 = vset1(p[s]), p1 = vset1(p[s + 1]);
        for (int64_t i = 0; i < hs / VL; i++) {
            even[i] = vfma(p0, kv_load(v + s * row, i * VL, kv, hs), even[i]);
            odd[i] = vfma(p1, kv_load(v + (s + 1) * row, i * VL, kv, hs), odd[i]);
        }
    }
    if (s < S)
        for (int64_t i = 0; i < hs / VL; i++) even[i] = vfma(vset1(p[s]), kv_load(v + s * row, i * VL, kv, hs), even[i]);
    for (int64_t i = 0; i < hs / VL; i++) vstore(out + i * VL, (even[i] + odd[i]) * vset1(inv));
}

/* Every query and head (see attend), split among the threads; the cache format and GPT-2's head
 * size literal in each parallel loop, so that each is compiled for its cache type. */
#define ATTEND_ALL(KV, HS)                                                                                 \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                       \
    for (int64_t rh = 0; rh < M * T * heads; rh++)                                                          \
        attend(KV, HS, rh / heads, rh % heads, M, T, qkv, d, heads, kc, vc, row_stride, max_len, start,     \
               mask, scores + rh * (start + T), ctx);

static void attention(const float *qkv, int64_t M, int64_t T, int64_t d, int64_t heads, const void *kc,
                      const void *vc, int64_t row_stride, int64_t max_len, int64_t start, int kv,
                      const uint8_t *mask, float *scores, float *ctx, int threads) {
    const int64_t hs = d / heads;
    if (kv == KV_Q8 && hs == 64) {
        ATTEND_ALL(KV_Q8, 64)
    } else if (kv == KV_Q8) {
        ATTEND_ALL(KV_Q8, hs)
    } else if (kv == KV_F16 && hs == 64) {
        ATTEND_ALL(KV_F16, 64)
    } else if (kv == KV_F16) {
        ATTEND_ALL(KV_F16, hs)
    } else if (hs == 64) {
        ATTEND_ALL(KV_F32, 64)
    } else {
        ATTEND_ALL(KV_F32, hs)
    }
}

/* The calling thread's working memory for a block step, kept between calls: a fresh malloc of a
 * batch's few hundred KiB is an mmap, page faults and an munmap every block. Aligned to cache
 * lines: malloc's 16 bytes made every vector load of a row straddle two lines (a 64-token prefill's
 * float32 products ran 1.5x slower on them than on PyTorch's 64-byte-aligned tensors). */
static float *scratch(size_t bytes) {
    static _Thread_local float *buffer;
    static _Thread_local size_t size;
    if (bytes > size) {
        free(buffer);
        bytes = (bytes + 63) / 64 * 64;
        buffer = aligned_alloc(64, bytes);
        size = buffer ? bytes : 0;
        if (!buffer) gf_fail();
    }
    return buffer;
}

/* Where gf_block_decode's time goes, for profiling (benchmarks/profile_decode.py): seconds in the
 * matrix products, in attention (with the cache writes) and in the rest (layer norms, GELU, the
 * residual adds), summed per calling thread while timing is on. */
enum { PRODUCTS, ATTENTION, REST, PARTS };
static _Thread_local int timing;
static _Thread_local double spent[PARTS], mark;

static inline void lap(int part) {  /* the time since the last lap goes to `part` */
    if (!timing) return;
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    const double now = t.tv_sec + 1e-9 * t.tv_nsec;
    if (part >= 0) spent[part] += now - mark;
    mark = now;
}

/* Turns timing on or off for this thread, and writes the seconds per part since the last call
 * into out[PARTS] (if not NULL), starting the sums again. */
void gf_block_profile(int on, double *out) {
    for (int i = 0; i < PARTS; i++) {
        if (out) out[i] = spent[i];
        spent[i] = 0.;
    }
    timing = on;
}

/* x (M T, d), the residual stream (sequence b's tokens in rows b T .. b T + T - 1), is updated in
 * place; kc/vc are this layer's cache (see attend), in format kv (KV_F32, KV_F16, KV_Q8). Needs
 * d / heads and 4 d to be whole numbers of vectors, and for KV_Q8 d / heads a multiple of 32 (the
 * caller checks). */
void gf_block_decode(const gf_block *blk, float *x, int64_t M, int64_t T, void *kc, void *vc, int64_t row_stride,
                     int64_t max_len, int64_t start, int64_t kv, const uint8_t *mask, int threads) {
    const int64_t d = blk->d, heads = blk->heads, hs = d / heads, R = M * T;
    float *h = scratch(sizeof(float) * R * (d + 3 * d + d + 4 * d + heads * (start + T)));
    if (!h) return;  /* gf_failed() tells the caller */
    float *qkv = h + R * d, *ctx = qkv + R * 3 * d, *ff = ctx + R * d, *scores = ff + R * 4 * d;

    lap(-1);
    layer_norm(x, R, d, blk->ln1_w, blk->ln1_b, blk->eps, h);
    lap(REST);
    if (blk->qkv.w) {
        gf_linear(&blk->qkv, h, R, qkv, threads);
    } else {  /* an inference view reading the model's own three matrices: products apart, rows interleaved */
        float *apart = ff;  /* R 4 d floats, free until the feed-forward */
        gf_linear(&blk->q, h, R, apart, threads);
        gf_linear(&blk->k, h, R, apart + R * d, threads);
        gf_linear(&blk->v, h, R, apart + 2 * R * d, threads);
        for (int64_t r = 0; r < R; r++)
            for (int part = 0; part < 3; part++)
                memcpy(qkv + r * 3 * d + part * d, apart + (part * R + r) * d, sizeof(float) * d);
    }
    lap(PRODUCTS);
    for (int64_t r = 0; r < R; r++)  /* the new tokens' keys and values into the cache, all before any attends */
        for (int64_t head = 0; head < heads; head++) {
            const int64_t position = start + r % T;
            const int64_t at = (r / T * row_stride + (head * max_len + position) * kv_row_elements((int)kv, hs)) * kv_element_size((int)kv);
            const float *key = qkv + r * 3 * d + d + head * hs, *value = key + d;
            kv_store((char *)kc + at, key, (int)kv, hs);
            kv_store((char *)vc + at, value, (int)kv, hs);
        }
    attention(qkv, M, T, d, heads, kc, vc, row_stride, max_len, start, (int)kv, mask, scores, ctx, threads);
    lap(ATTENTION);
    gf_linear(&blk->proj, ctx, R, h, threads);
    lap(PRODUCTS);
    for (int64_t i = 0; i < R * d; i++) x[i] += h[i];

    layer_norm(x, R, d, blk->ln2_w, blk->ln2_b, blk->eps, h);
    lap(REST);
    gf_linear(&blk->fc1, h, R, ff, threads);
    lap(PRODUCTS);
    gelu(ff, R * 4 * d, threads);
    lap(REST);
    gf_linear(&blk->fc2, ff, R, h, threads);
    lap(PRODUCTS);
    for (int64_t i = 0; i < R * d; i++) x[i] += h[i];
    lap(REST);
}

/* A whole GPTModel's decode step in one call (built by gptforge/kernels/block.py): the token and
 * position embeddings, every block (gf_block_decode), the final layer norm and the output head.
 * A step of GPT-2 124M makes ~15 calls from Python through its blocks, each with PyTorch's tensor
 * bookkeeping around it; at 4-bit weights that was a fifth of the step. */
typedef struct {
    int64_t layers, d, vocab, positions;  /* vocab, positions: rows of the two embedding tables */
    const float *tok_emb, *pos_emb;       /* (vocab, d), (positions, d) */
    const gf_block *const *blocks;        /* layers of them */
    const float *lnf_w, *lnf_b;
    double eps;
    gf_lin head;                          /* (n, d): logits (M, n) */
} gf_model;

/* T new tokens in each of M rows: tokens, positions (M, T); the cache of layer l at kc / vc +
 * l * layer_stride elements (rows as in gf_block_decode), positions [0, start) cached, these
 * written at [start, start + T); mask as gf_block_decode's; work (2 M T d floats); logits (M, head.n),
 * of each row's last token. Returns 0, or 1 (nothing done) where a token or position is outside its
 * embedding table. */
int gf_model_decode(const gf_model *mdl, const int64_t *tokens, const int64_t *positions, int64_t M, int64_t T,
                    void *kc, void *vc, int64_t layer_stride, int64_t row_stride, int64_t max_len,
                    int64_t start, int64_t kv, const uint8_t *mask, float *work, float *logits, int threads) {
    const int64_t d = mdl->d, size = kv_element_size((int)kv), R = M * T;
    for (int64_t r = 0; r < R; r++)
        if (tokens[r] < 0 || tokens[r] >= mdl->vocab || positions[r] < 0 || positions[r] >= mdl->positions)
            return 1;
    float *x = work, *h = work + R * d;
    lap(-1);
    for (int64_t r = 0; r < R; r++) {
        const float *te = mdl->tok_emb + tokens[r] * d, *pe = mdl->pos_emb + positions[r] * d;
        for (int64_t i = 0; i < d; i += VL) vstore(x + r * d + i, vload(te + i) + vload(pe + i));
    }
    lap(REST);
    for (int64_t l = 0; l < mdl->layers; l++)
        gf_block_decode(mdl->blocks[l], x, M, T, (char *)kc + l * layer_stride * size, (char *)vc + l * layer_stride * size,
                        row_stride, max_len, start, kv, mask, threads);
    for (int64_t m = 0; m < M; m++)  /* each row's last token goes on to the head */
        memmove(x + m * d, x + (m * T + T - 1) * d, sizeof(float) * d);
    layer_norm(x, M, d, mdl->lnf_w, mdl->lnf_b, mdl->eps, h);
    lap(REST);
    gf_linear(&mdl->head, h, M, logits, threads);
    lap(PRODUCTS);
    return 0;
}

/* The layout of the structs above as this compiler laid them out, for kernels/abi.py to compare with
 * its ctypes mirrors: GF_ABI_VERSION, then for gf_lin, gf_block and gf_model in turn the struct's
 * size and each field's offset, in bytes, into out[0 .. cap). Returns how many values there are. */
int gf_abi(int64_t *out, int64_t cap) {
    const int64_t layout[] = {
        GF_ABI_VERSION,
        sizeof(gf_lin), offsetof(gf_lin, fmt), offsetof(gf_lin, n), offsetof(gf_lin, k), offsetof(gf_lin, w),
        offsetof(gf_lin, wp), offsetof(gf_lin, scale), offsetof(gf_lin, bias), offsetof(gf_lin, ld),
        sizeof(gf_block), offsetof(gf_block, d), offsetof(gf_block, heads), offsetof(gf_block, ln1_w),
        offsetof(gf_block, ln1_b), offsetof(gf_block, ln2_w), offsetof(gf_block, ln2_b), offsetof(gf_block, eps),
        offsetof(gf_block, qkv), offsetof(gf_block, proj), offsetof(gf_block, fc1), offsetof(gf_block, fc2),
        offsetof(gf_block, q), offsetof(gf_block, k), offsetof(gf_block, v),
        sizeof(gf_model), offsetof(gf_model, layers), offsetof(gf_model, d), offsetof(gf_model, vocab),
        offsetof(gf_model, positions), offsetof(gf_model, tok_emb), offsetof(gf_model, pos_emb),
        offsetof(gf_model, blocks), offsetof(gf_model, lnf_w), offsetof(gf_model, lnf_b), offsetof(gf_model, eps),
        offsetof(gf_model, head),
    };
    const int64_t count = (int64_t)(sizeof(layout) / sizeof(layout[0]));
    for (int64_t i = 0; i < count && i < cap; i++) out[i] = layout[i];
    return (int)count;
}
