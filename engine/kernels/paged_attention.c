/* Paged attention for CPU: writes a step's K/V into the block cache and attends short query runs
 * (decodes, small chunks) over the cache in place, without gathering K/V into a contiguous copy.
 *
 * Cache layout per layer: [num_blocks, 2, block_size, num_kv_heads, head_dim] (K = 0, V = 1), the
 * NHD layout FlashInfer uses on GPU. Accumulation is fp32 for fp32 and bf16 caches alike; bf16
 * results are rounded to nearest even, as torch rounds.
 *
 * Written with GCC/Clang vector extensions (16 floats per vector), so one source compiles to
 * AVX-512, AVX2 or NEON, whichever `-march=native` offers. No torch headers: the engine compiles it
 * with the system C compiler on first use (engine/kernels/__init__.py) and calls it via ctypes.
 * The loader builds one library per attention shape (HEAD_DIM, GROUP query heads per kv head,
 * KV_HEADS), so the loops over heads and the head dimension have constant trip counts.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(HEAD_DIM) || !defined(GROUP) || !defined(KV_HEADS)
#error "compile with -DHEAD_DIM=<multiple of 16> -DGROUP=<query heads per kv head> -DKV_HEADS=<kv heads>"
#endif
#if HEAD_DIM % 16
#error "HEAD_DIM must be a multiple of 16"
#endif
#define NV (HEAD_DIM / 16)
#define NUM_HEADS (KV_HEADS * GROUP)
#define WIDTH (KV_HEADS * HEAD_DIM) /* elements of one token's K (or V) row, all heads */
#ifndef PARTITION
#define PARTITION 256 /* keys per work item; a multiple of 16 */
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t bf16_t;

static inline f32x16 splat(float x) { return (f32x16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

/* Lane-wise max (C has no vector ternary). */
static inline f32x16 vmax(f32x16 a, f32x16 b) {
    u32x16 take_b = (u32x16)(b > a);
    return (f32x16)(((u32x16)a & ~take_b) | ((u32x16)b & take_b));
}

static inline f32x16 load_f32(const float* p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }
static inline float load1_f32(float x) { return x; }
static inline float load1_bf16(bf16_t x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
static inline void store_f32(float* p, f32x16 v) { memcpy(p, &v, sizeof v); }

static inline f32x16 load_bf16(const bf16_t* p) {
    u16x16 h;
    memcpy(&h, p, sizeof h);
    return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
}

static inline void store_bf16(bf16_t* p, f32x16 v) {
    u32x16 u = (u32x16)v;
    u32x16 rounded = u + 0x7fffu + ((u >> 16) & 1u);
    u32x16 is_nan = (u32x16)(v != v);
    u32x16 bits = (rounded & ~is_nan) | ((u | 0x400000u) & is_nan);
    u16x16 h = __builtin_convertvector(bits >> 16, u16x16);
    memcpy(p, &h, sizeof h);
}

/* exp(x) for x <= 0 (Cephes polynomial, ~1 ulp); below -87 it gives ~1e-38 instead of 0. */
static inline f32x16 exp_nonpositive(f32x16 x) {
    x = vmax(x, splat(-87.0f));
    f32x16 k = x * 1.44269504088896341f + 12582912.0f - 12582912.0f; /* round to nearest */
    f32x16 r = x - k * 0.693359375f + k * 2.12194440e-4f;
    f32x16 p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    i32x16 e = (__builtin_convertvector(k, i32x16) + 127) << 23;
    return p * (f32x16)e;
}

static inline float hsum(f32x16 v) {
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

static inline float hmax(f32x16 v) {
    v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    return v[0];
}

/* Sixteen rows of sixteen 32-bit lanes -> their transpose (out[j][i] = in[i][j]), in four
 * stages of two-input shuffles (2x2, 4x4, 8x8, 16x16 blocks). */
static inline void transpose16(const u32x16 in[16], u32x16 out[16]) {
    u32x16 a[16], b[16], c[16];
    for (int i = 0; i < 16; i += 2) {
        a[i] = __builtin_shufflevector(in[i], in[i + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
        a[i + 1] = __builtin_shufflevector(in[i], in[i + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    }
    for (int i = 0; i < 16; i += 4)
        for (int k = 0; k < 2; k++) {
            b[i + k] = __builtin_shufflevector(a[i + k], a[i + k + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
            b[i + k + 2] = __builtin_shufflevector(a[i + k], a[i + k + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
        }
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 4; k++) {
            c[i + k] = __builtin_shufflevector(b[i + k], b[i + k + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
            c[i + k + 4] = __builtin_shufflevector(b[i + k], b[i + k + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
        }
    for (int k = 0; k < 8; k++) {
        out[k] = __builtin_shufflevector(c[k], c[k + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
        out[k + 8] = __builtin_shufflevector(c[k], c[k + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
}

/* Lanes [n, 16) of v replaced by `fill`. */
static inline f32x16 keep_first(f32x16 v, int64_t n, float fill) {
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    u32x16 keep = (u32x16)(lane < (int32_t)n);
    return (f32x16)(((u32x16)v & keep) | ((u32x16)splat(fill) & ~keep));
}

/* Sixteen partial-sum vectors -> one vector whose lane i is the total of a[i] (a transpose-add
 * tree: 15 adds instead of 16 horizontal sums). */
static inline f32x16 reduce16(const f32x16 a[16]) {
    f32x16 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

#define T float
#define SUFFIX f32
#include "paged_attention_impl.h"
#undef T
#undef SUFFIX

#define T bf16_t
#define SUFFIX bf16
#if defined(__AVX512BF16__) && HEAD_DIM % 32 == 0
/* bf16 prefill on CPUs with AVX512-BF16: scores and P.V as bf16 pair dot products (vdpbf16ps,
 * fp32 accumulation), twice the multiply-adds per instruction of fp32 FMAs. */
#include <immintrin.h>
#define PREFILL_BF16_DOT 1
#endif
#include "paged_attention_impl.h"
#undef PREFILL_BF16_DOT
#undef T
#undef SUFFIX
