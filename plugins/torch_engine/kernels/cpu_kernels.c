/* Float32 CPU kernels of the torch engine (x86-64, AVX2 + FMA), called through ctypes by
 * plugins/torch_engine/kernels/__init__.py. The callers own every buffer; nothing here
 * allocates memory that outlives a call.
 *
 * gemm_packed: y[m, n] = x[m, k] @ w.T (+ bias) for a weight w[n, k] stored as panels
 *   p[n / 16][k][16]. Each 16-column panel is streamed once from memory and kept in cache
 *   while every row tile of x (6 rows: 12 accumulators) passes over it, so small-m GEMMs
 *   (decode) stream the weights at memory speed and large-m ones run at the FMA rate.
 * decode_attention: one query token per sequence against its paged keys and values, read
 *   in place from the engine's KV pool (no gathered copy). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define NR 16 /* panel width: two 8-float vectors */
#define MR 6  /* rows per tile */
#ifndef MB
#define MB 192 /* rows per block (a multiple of MR) */
#endif
#ifndef PREFETCH
#define PREFETCH 32 /* panel lines (k steps) fetched ahead */
#endif

static inline __attribute__((always_inline)) void gemm_tile(const float *x, int64_t ldx, const float *p, int k,
                                                            float *y, int64_t ldy, const float *bias, const int rows) {
    __m256 acc[MR][2];
    for (int r = 0; r < rows; ++r) {
        acc[r][0] = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
        acc[r][1] = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
    }
    for (int i = 0; i < k; ++i) {
        if (rows >= 4) /* few rows are bound by memory alone: the hardware prefetcher keeps up */
            _mm_prefetch((const char *)(p + (int64_t)(i + PREFETCH) * NR), _MM_HINT_T0);
        const __m256 w0 = _mm256_load_ps(p + (int64_t)i * NR);
        const __m256 w1 = _mm256_load_ps(p + (int64_t)i * NR + 8);
        for (int r = 0; r < rows; ++r) {
            const __m256 b = _mm256_broadcast_ss(x + r * ldx + i);
            acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < rows; ++r) {
        _mm256_storeu_ps(y + r * ldy, acc[r][0]);
        _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
    }
}

/* The row count is a compile-time constant in each call, so every tile height unrolls. */
static void gemm_panel(const float *x, int64_t ldx, int m, const float *p, int k, float *y, int64_t ldy,
                       const float *bias) {
    int r = 0;
    for (; r + MR <= m; r += MR) gemm_tile(x + r * ldx, ldx, p, k, y + r * ldy, ldy, bias, MR);
    const float *xr = x + r * ldx;
    float *yr = y + r * ldy;
    switch (m - r) {
    case 5: gemm_tile(xr, ldx, p, k, yr, ldy, bias, 5); break;
    case 4: gemm_tile(xr, ldx, p, k, yr, ldy, bias, 4); break;
    case 3: gemm_tile(xr, ldx, p, k, yr, ldy, bias, 3); break;
    case 2: gemm_tile(xr, ldx, p, k, yr, ldy, bias, 2); break;
    case 1: gemm_tile(xr, ldx, p, k, yr, ldy, bias, 1); break;
    default: break;
    }
}

/* x: m rows of k floats, ldx apart; p: n / 16 panels (n a multiple of 16, 32-byte aligned);
 * y: m rows of n floats, ldy apart; bias: n floats or NULL. Rows go in blocks of MB, each
 * block (in L2) passing over every panel before the next, so a prefill chunk streams its
 * rows from L2 rather than re-reading all of x from memory for each panel. */
void gemm_packed(const float *x, int m, int k, int64_t ldx, const float *p, int n, float *y, int64_t ldy,
                 const float *bias, int threads) {
    const int panels = n / NR;
    for (int r0 = 0; r0 < m; r0 += MB) {
        const int rows = m - r0 < MB ? m - r0 : MB;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (int j = 0; j < panels; ++j)
            gemm_panel(x + r0 * ldx, ldx, rows, p + (int64_t)j * k * NR, k, y + r0 * ldy + j * NR, ldy,
                       bias ? bias + j * NR : NULL);
    }
}

/* Scores of `count` (<= 4) query vectors against one key: independent FMA chains per query. */
static inline void dots(const float *q, int64_t q_stride, const float *key, int dim, int count, float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int i = 0; i < dim; i += 8) {
        const __m256 k = _mm256_loadu_ps(key + i);
        for (int g = 0; g < count; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * q_stride + i), k, acc[g]);
    }
    for (int g = 0; g < count; ++g) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[g]), _mm256_extractf128_ps(acc[g], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        out[g] = _mm_cvtss_f32(s);
    }
}

static inline void axpy(float a, const float *x, float *y, int d) {
    const __m256 va = _mm256_set1_ps(a);
    for (int i = 0; i < d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}

/* q, out: [seqs, heads, dim]; the key of token t of sequence s, kv head h, is at
 *   pool + tables[s * width + t / block] * block_stride + t % block * token_stride + h * dim,
 * its value v_offset floats further (pool already offset to this layer). lens[s]: tokens in
 * the cache, this step's included. heads / kv_heads query heads share a kv head; dim % 8 == 0.
 * One job per sequence, so each token's keys (all kv heads) are read as one run.
 * Returns 0, or -1 when scratch memory could not be had (out is then incomplete). */
int decode_attention(const float *q, const float *pool, int64_t block_stride, int64_t token_stride,
                     int64_t v_offset, const int64_t *tables, int width, const int32_t *lens, int seqs,
                     int heads, int kv_heads, int dim, int block, float scale, float *out, int threads) {
    const int group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1) reduction(| : failed)
    for (int s = 0; s < seqs; ++s) {
        const int len = lens[s];
        float *scores = malloc(sizeof(float) * (size_t)heads * (size_t)(len > 0 ? len : 1));
        if (!scores) { failed = 1; continue; }
        const int64_t *table = tables + (int64_t)s * width;
        const float *qs = q + (int64_t)s * heads * dim;
        float *os = out + (int64_t)s * heads * dim;
        float sc[4];
        for (int t = 0; t < len; ++t) {
            const float *row = pool + table[t / block] * block_stride + (t % block) * token_stride;
            for (int h = 0; h < kv_heads; ++h)
                for (int g = 0; g < group; g += 4) {
                    const int count = group - g < 4 ? group - g : 4, head = h * group + g;
                    dots(qs + (int64_t)head * dim, dim, row + (int64_t)h * dim, dim, count, sc);
                    for (int c = 0; c < count; ++c) scores[(int64_t)(head + c) * len + t] = sc[c] * scale;
                }
        }
        for (int head = 0; head < heads; ++head) {
            float *sh = scores + (int64_t)head * len, top = -INFINITY, total = 0.0f;
            for (int t = 0; t < len; ++t) top = sh[t] > top ? sh[t] : top;
            for (int t = 0; t < len; ++t) total += (sh[t] = expf(sh[t] - top));
            const float inv = 1.0f / total;
            for (int t = 0; t < len; ++t) sh[t] *= inv;
            for (int i = 0; i < dim; ++i) os[(int64_t)head * dim + i] = 0.0f;
        }
        for (int t = 0; t < len; ++t) {
            const float *row = pool + v_offset + table[t / block] * block_stride + (t % block) * token_stride;
            for (int head = 0; head < heads; ++head)
                axpy(scores[(int64_t)head * len + t], row + (int64_t)(head / group) * dim, os + (int64_t)head * dim, dim);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
