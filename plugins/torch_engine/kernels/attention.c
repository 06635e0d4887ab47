/* decode_attention: one query token per sequence against its paged keys and values, read in
 * place from the engine's KV pool (no gathered copy). */
#include <stdatomic.h>
#include <stdlib.h>

#include "kernels.h"

/* The 8 sums of a[0..7]'s lanes, as one vector (lane t: the sum of a[t]). */
static inline __m256 hsum8x8(const __m256 *a) {
    const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 lo = _mm256_hadd_ps(s01, s23), hi = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

/* scores[t] = scale * q . keys[t] for `count` (<= 8) keys; q: dim floats (dim % 8 == 0). */
static inline void scores8(const float *q, const float *const *keys, int count, int dim, float scale, float *scores) {
    __m256 acc[8];
    for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < dim; i += 8) {
        const __m256 qi = _mm256_loadu_ps(q + i);
        for (int t = 0; t < count; ++t) acc[t] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(keys[t] + i), acc[t]);
    }
    float sums[8];
    _mm256_storeu_ps(sums, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
    for (int t = 0; t < count; ++t) scores[t] = sums[t];
}

/* out[0, dim) = sum_t p[t] * values[t], dim % 8 == 0, in registers 64 floats at a time. */
static inline void weighted_sum(const float *p, const float *const *values, int len, int dim, float *out) {
    for (int i0 = 0; i0 < dim; i0 += 64) {
        const int w = dim - i0 < 64 ? (dim - i0) / 8 : 8;
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
        for (int t = 0; t < len; ++t) {
            const __m256 pt = _mm256_broadcast_ss(p + t);
            for (int j = 0; j < w; ++j) acc[j] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(values[t] + i0 + 8 * j), acc[j]);
        }
        for (int j = 0; j < w; ++j) _mm256_storeu_ps(out + i0 + 8 * j, acc[j]);
    }
}

/* scores[0, len) := softmax(scores) in place. */
static void softmax(float *s, int len) {
    float top = -INFINITY, total = 0.0f;
    for (int t = 0; t < len; ++t) top = s[t] > top ? s[t] : top;
    const __m256 vtop = _mm256_set1_ps(top);
    __m256 vsum = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= len; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vtop));
        _mm256_storeu_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    total = hsum8(vsum);
    for (; t < len; ++t) total += (s[t] = expf(s[t] - top));
    const float inv = 1.0f / total;
    for (t = 0; t < len; ++t) s[t] *= inv;
}

struct attention_job {
    const float *q, *pool;
    const int64_t *tables;
    const int32_t *lens;
    float *out;
    int64_t q_stride, block_stride, token_stride, v_offset;
    int width, seqs, heads, kv_heads, dim, block;
    float scale;
    _Atomic int next; /* the next sequence to take */
    _Atomic int failed;
};

static void attention_part(void *arg, int part, int parts) {
    (void)part, (void)parts;
    struct attention_job *a = arg;
    const int group = a->heads / a->kv_heads, dim = a->dim;
    for (int s; (s = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed)) < a->seqs;) {
        const int len = a->lens[s] > 0 ? a->lens[s] : 0;
        /* per token: its key and value in the pool, for one kv head at a time */
        const float **keys = malloc(sizeof(float *) * 2 * (size_t)(len + 8));
        float *p = malloc(sizeof(float) * (size_t)(len + 8));
        if (!keys || !p) {
            free(keys), free(p);
            atomic_store(&a->failed, 1);
            continue;
        }
        const float **values = keys + len + 8;
        const int64_t *table = a->tables + (int64_t)s * a->width;
        for (int h = 0; h < a->kv_heads; ++h) {
            for (int t = 0; t < len; ++t) {
                keys[t] = a->pool + table[t / a->block] * a->block_stride + (t % a->block) * a->token_stride + (int64_t)h * dim;
                values[t] = keys[t] + a->v_offset;
            }
            for (int g = 0; g < group; ++g) {
                const int head = h * group + g;
                const float *qh = a->q + (int64_t)s * a->q_stride + (int64_t)head * dim;
                for (int t = 0; t < len; t += 8) scores8(qh, keys + t, len - t < 8 ? len - t : 8, dim, a->scale, p + t);
                softmax(p, len);
                weighted_sum(p, values, len, dim, a->out + ((int64_t)s * a->heads + head) * dim);
            }
        }
        free(keys);
        free(p);
    }
}

/* q: [seqs][heads * dim], rows q_stride floats apart; out: [seqs, heads, dim] dense; the key
 * of token t of sequence s, kv head h, is at
 *   pool + tables[s * width + t / block] * block_stride + t % block * token_stride + h * dim,
 * its value v_offset floats further (pool already offset to this layer). lens[s]: tokens in
 * the cache, this step's included. heads / kv_heads query heads share a kv head; dim % 8 == 0.
 * The threads take one sequence at a time; for each kv head its token rows are looked up
 * once, then each query head's scores are taken 8 keys at a time and its output summed in
 * registers. Returns 0, or -1 when scratch memory could not be had (out is then incomplete). */
int decode_attention(const float *q, int64_t q_stride, const float *pool, int64_t block_stride, int64_t token_stride,
                     int64_t v_offset, const int64_t *tables, int width, const int32_t *lens, int seqs,
                     int heads, int kv_heads, int dim, int block, float scale, float *out, int threads) {
    struct attention_job job = {q, pool, tables, lens, out, q_stride, block_stride, token_stride, v_offset,
                                width, seqs, heads, kv_heads, dim, block, scale, 0, 0};
    run_parts(attention_part, &job, threads < seqs ? threads : seqs);
    return atomic_load(&job.failed) ? -1 : 0;
}
