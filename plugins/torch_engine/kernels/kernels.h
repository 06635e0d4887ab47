/* Float32 CPU kernels of the torch engine (x86-64, AVX2 + FMA), called through ctypes by
 * plugins/torch_engine/kernels/__init__.py, which compiles every .c file here into one
 * library. The callers own every buffer; nothing here allocates memory that outlives a call.
 *
 *   gemm.c       gemm_packed: y[m, n] (+)= x[m, k] @ w.T (+ bias), w stored as 16-column panels
 *   attention.c  decode_attention: one query per sequence over its paged K/V, read in place
 *   layers.c     rms_norm, silu_mul, rope_store (RoPE with the step's KV writes), and
 *                decode_layers: every decoder layer of a decode step in one call
 *   logits.c     argmax_rows: the greedy pick over a step's logits
 *   pool.c       run_parts: the library's own thread pool
 *
 * Threads: gemm_packed and decode_attention split their work over the pool's `threads - 1`
 * workers plus the caller. Not OpenMP: its teams are per calling thread, and with the
 * engine's loop thread and the thread that loaded the model each holding one, libgomp
 * counts more threads than cores and stops spinning between regions, so every region waited
 * on a futex wake-up (~0.2 ms on these VMs, 150 regions a step). The pool's workers spin for
 * a while after each job before they sleep. One caller at a time uses the pool; a
 * concurrent caller runs its work alone. The elementwise kernels and argmax_rows run on the
 * caller only: their work is smaller than a wake-up. */
#ifndef TRIDENT_KERNELS_H
#define TRIDENT_KERNELS_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* ---- pool.c ---- */
typedef void (*part_fn)(void *arg, int part, int parts);

/* fn(arg, part, parts) for part = 0 .. parts - 1, parts <= threads, the caller taking part 0;
 * returns when every part is done. */
void run_parts(part_fn fn, void *arg, int threads);

static inline void part_range(int n, int part, int parts, int *lo, int *hi) {
    *lo = (int)((int64_t)n * part / parts);
    *hi = (int)((int64_t)n * (part + 1) / parts);
}


/* exp(x) for 8 floats: 2^n * e^r with |r| <= ln2 / 2 and a degree-6 polynomial (about 2 ulp). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- the entry points (each file's comments say more) ---- */
void gemm_packed(const float *x, int m, int k, int64_t ldx, const float *p, int n, float *y, int64_t ldy,
                 const float *bias, int add, int threads);
int decode_attention(const float *q, int64_t q_stride, const float *pool, int64_t block_stride, int64_t token_stride,
                     int64_t v_offset, const int64_t *tables, int width, const int32_t *lens, int seqs,
                     int heads, int kv_heads, int dim, int block, float scale, float *out, int threads);
void rms_norm(const float *x, int64_t ldx, int rows, int dim, const float *w, float eps, float *out, int64_t ldo);
void silu_mul(const float *gu, int64_t ldg, int rows, int width, float *out);
void argmax_rows(const float *x, int64_t ld, int rows, int n, int64_t *out);
void rope_store(float *qkv, int64_t ld, int rows, const float *cos, const float *sin, int heads, int kv_heads,
                int dim, float *pool, int64_t block_stride, int64_t token_stride, int64_t v_offset,
                const int64_t *blocks, const int64_t *offsets);

#endif
