/* A decoder layer's elementwise steps, one pass each (rope_store also writes the step's keys
 * and values into their pool slots), and decode_layers: a whole decode step's layers. */
#include <string.h>

#include "kernels.h"

/* out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)), rows ldx / ldo floats apart, any dim. */
void rms_norm(const float *x, int64_t ldx, int rows, int dim, const float *w, float eps, float *out, int64_t ldo) {
    for (int r = 0; r < rows; ++r) {
        const float *xr = x + r * ldx;
        float *yr = out + r * ldo;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int i = 0;
        for (; i + 16 <= dim; i += 16) {
            const __m256 u = _mm256_loadu_ps(xr + i), v = _mm256_loadu_ps(xr + i + 8);
            a0 = _mm256_fmadd_ps(u, u, a0);
            a1 = _mm256_fmadd_ps(v, v, a1);
        }
        float total = hsum8(_mm256_add_ps(a0, a1));
        for (; i < dim; ++i) total += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(total / (float)dim + eps);
        const __m256 vinv = _mm256_set1_ps(inv);
        for (i = 0; i + 8 <= dim; i += 8)
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), vinv)));
        for (; i < dim; ++i) yr[i] = w[i] * (xr[i] * inv);
    }
}

/* out[r, i] = silu(gu[r, i]) * gu[r, width + i]: SwiGLU over a fused gate/up projection whose
 * rows are ldg floats apart; out is dense [rows, width]. */
void silu_mul(const float *gu, int64_t ldg, int rows, int width, float *out) {
    for (int r = 0; r < rows; ++r) {
        const float *g = gu + r * ldg, *u = g + width;
        float *o = out + (int64_t)r * width;
        int i = 0;
        for (; i + 8 <= width; i += 8) {
            const __m256 vg = _mm256_loadu_ps(g + i);
            const __m256 sig = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), vg)));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(vg, sig), _mm256_loadu_ps(u + i)));
        }
        for (; i < width; ++i) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* Rotate-half RoPE: x[i] * c[i] - x[i + half] * s[i], x[i + half] * c[i + half] + x[i] * s[i + half].
 * Each pair is read before it is written, so y may be x. */
static inline void rope(const float *x, const float *c, const float *s, int dim, float *y) {
    const int half = dim / 2;
    for (int i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        y[i] = a * c[i] - b * s[i];
        y[i + half] = b * c[i + half] + a * s[i + half];
    }
}

/* For each of `rows` new tokens: qkv[r] = [q heads | k heads | v heads] (rows ld floats apart).
 * Rotates the query heads in place, and writes the rotated keys and the values into the
 * token's slot: pool + blocks[r] * block_stride + offsets[r] * token_stride (+ v_offset for
 * the value), pool already offset to this layer. cos, sin: [rows, dim], this token's angles. */
void rope_store(float *qkv, int64_t ld, int rows, const float *cos, const float *sin, int heads, int kv_heads,
                int dim, float *pool, int64_t block_stride, int64_t token_stride, int64_t v_offset,
                const int64_t *blocks, const int64_t *offsets) {
    for (int r = 0; r < rows; ++r) {
        float *x = qkv + r * ld;
        const float *c = cos + (int64_t)r * dim, *s = sin + (int64_t)r * dim;
        float *slot = pool + blocks[r] * block_stride + offsets[r] * token_stride;
        for (int h = 0; h < heads; ++h) rope(x + h * dim, c, s, dim, x + h * dim);
        for (int h = 0; h < kv_heads; ++h) rope(x + (heads + h) * dim, c, s, dim, slot + h * dim);
        memcpy(slot + v_offset, x + (heads + kv_heads) * dim, sizeof(float) * (size_t)kv_heads * (size_t)dim);
    }
}

/* ---- a whole decode step ------------------------------------------------------------------ */

/* One decoder layer's weights: RMSNorm weights, packed projections (qkv: (heads + 2 kv_heads)
 * dim rows, gate_up: 2 inter rows, gate first), biases or NULL. Owned by the caller's model. */
struct layer_weights {
    const float *attn_norm, *mlp_norm, *qkv, *qkv_bias, *o, *o_bias, *gate_up, *down;
};

/* Every layer of a Llama decoder for `rows` decode tokens (one per sequence), in place on the
 * residual stream h [rows, hidden]; the final norm and LM head are the caller's. The same
 * steps as the model's per-op forward: RMSNorm, qkv, rope_store into layer l's pool
 * (pool + l * layer_stride), decode_attention, h += o, RMSNorm, gate_up, SwiGLU, h += down.
 * cos, sin: [rows, dim]; slots, tables and lens as for rope_store and decode_attention.
 * scratch: rows * (hidden + qkv_n + heads * dim + 3 * inter) floats. Returns 0, or -1 when
 * attention found no memory (h is then not to be used). */
int decode_layers(float *h, int rows, int hidden, int layers, const struct layer_weights *w, float eps, int heads,
                  int kv_heads, int dim, int inter, const float *cos, const float *sin, float *pool,
                  int64_t layer_stride, int64_t block_stride, int64_t token_stride, int64_t v_offset,
                  const int64_t *slot_blocks, const int64_t *slot_offsets, const int64_t *tables, int width,
                  const int32_t *lens, int block, float scale, float *scratch, int threads) {
    const int q_n = heads * dim, qkv_n = q_n + 2 * kv_heads * dim;
    float *x = scratch, *qkv = x + (int64_t)rows * hidden, *attn = qkv + (int64_t)rows * qkv_n;
    float *gu = attn + (int64_t)rows * q_n, *act = gu + (int64_t)rows * 2 * inter;
    int rc = 0;
    for (int l = 0; l < layers && rc == 0; ++l) {
        const struct layer_weights *lw = w + l;
        float *pl = pool + l * layer_stride;
        rms_norm(h, hidden, rows, hidden, lw->attn_norm, eps, x, hidden);
        gemm_packed(x, rows, hidden, hidden, lw->qkv, qkv_n, qkv, qkv_n, lw->qkv_bias, 0, threads);
        rope_store(qkv, qkv_n, rows, cos, sin, heads, kv_heads, dim, pl, block_stride, token_stride, v_offset,
                   slot_blocks, slot_offsets);
        rc = decode_attention(qkv, qkv_n, pl, block_stride, token_stride, v_offset, tables, width, lens, rows, heads,
                              kv_heads, dim, block, scale, attn, threads);
        gemm_packed(attn, rows, q_n, q_n, lw->o, hidden, h, hidden, lw->o_bias, 1, threads);
        rms_norm(h, hidden, rows, hidden, lw->mlp_norm, eps, x, hidden);
        gemm_packed(x, rows, hidden, hidden, lw->gate_up, 2 * inter, gu, 2 * inter, NULL, 0, threads);
        silu_mul(gu, 2 * inter, rows, inter, act);
        gemm_packed(act, rows, inter, inter, lw->down, hidden, h, hidden, NULL, 1, threads);
    }
    return rc;
}
