/* gemm_packed: y[m, n] (+)= x[m, k] @ w.T (+ bias) for a weight w[n, k] stored as panels
 * p[n / 16][k][16]. Each 16-column panel stays in cache while every row tile of x (6 rows: 12
 * accumulators) passes over it, and with several tiles those passes prefetch the next panel,
 * so small-m GEMMs (decode) stream the weights at memory speed and large-m ones run at the
 * FMA rate. The threads take contiguous runs of panels. */
#include "kernels.h"

#define NR 16 /* panel width: two 8-float vectors; one k step of a panel is one 64-byte line */
#define MR 6  /* rows per tile */
#ifndef MB
#define MB 192 /* rows per block (a multiple of MR) */
#endif

/* One tile: rows (<= MR, a constant at each call) of x against one panel. Along the way it
 * prefetches pf_lines lines of the next panel from pf (this tile's share of it). */
static inline __attribute__((always_inline)) void gemm_tile(const float *x, int64_t ldx, const float *p, int k,
                                                            float *y, int64_t ldy, const float *bias, int add,
                                                            const float *pf, int pf_lines, const int rows) {
    __m256 acc[MR][2];
    /* Every tile height fully unrolled (rolled, the 4- and 5-row tiles ran at half speed). */
#pragma GCC unroll 6
    for (int r = 0; r < rows; ++r) {
        acc[r][0] = add ? _mm256_loadu_ps(y + r * ldy) : _mm256_setzero_ps();
        acc[r][1] = add ? _mm256_loadu_ps(y + r * ldy + 8) : _mm256_setzero_ps();
        if (bias) {
            acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(bias));
            acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(bias + 8));
        }
    }
    for (int i = 0; i < k; ++i) {
        if (i < pf_lines) _mm_prefetch((const char *)(pf + (int64_t)i * NR), _MM_HINT_T1);
        const __m256 w0 = _mm256_load_ps(p + (int64_t)i * NR);
        const __m256 w1 = _mm256_load_ps(p + (int64_t)i * NR + 8);
    #pragma GCC unroll 6
    for (int r = 0; r < rows; ++r) {
            const __m256 b = _mm256_broadcast_ss(x + r * ldx + i);
            acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < rows; ++r) {
        _mm256_storeu_ps(y + r * ldy, acc[r][0]);
        _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
    }
}

/* All m rows against one panel; the tiles share the prefetch of the next panel (NULL: none,
 * as for a single tile: the hardware prefetcher keeps up with one pass, measured faster). */
static void gemm_panel(const float *x, int64_t ldx, int m, const float *p, int k, float *y, int64_t ldy,
                       const float *bias, int add, const float *next) {
    const int tiles = (m + MR - 1) / MR, share = (k + tiles - 1) / tiles;
    int r = 0, t = 0;
    for (; r + MR <= m; r += MR, ++t) {
        const int lo = t * share, lines = next ? (k - lo < share ? k - lo : share) : 0;
        gemm_tile(x + r * ldx, ldx, p, k, y + r * ldy, ldy, bias, add, next ? next + (int64_t)lo * NR : NULL, lines, MR);
    }
    const float *xr = x + r * ldx, *pf = next ? next + (int64_t)t * share * NR : NULL;
    float *yr = y + r * ldy;
    const int lines = next ? k - t * share : 0;
    switch (m - r) {
    case 5: gemm_tile(xr, ldx, p, k, yr, ldy, bias, add, pf, lines, 5); break;
    case 4: gemm_tile(xr, ldx, p, k, yr, ldy, bias, add, pf, lines, 4); break;
    case 3: gemm_tile(xr, ldx, p, k, yr, ldy, bias, add, pf, lines, 3); break;
    case 2: gemm_tile(xr, ldx, p, k, yr, ldy, bias, add, pf, lines, 2); break;
    case 1: gemm_tile(xr, ldx, p, k, yr, ldy, bias, add, pf, lines, 1); break;
    default: break;
    }
}

/* x: m rows of k floats, ldx apart; p: n / 16 panels (n a multiple of 16, 32-byte aligned);
 * y: m rows of n floats, ldy apart, overwritten (add = 0) or added to (add = 1); bias: n
 * floats or NULL. Rows go in blocks of MB, each block (in L2) passing over every panel before
 * the next, so a prefill chunk streams its rows from L2 rather than re-reading all of x from
 * memory for each panel. */
struct gemm_job {
    const float *x, *p, *bias;
    float *y;
    int64_t ldx, ldy;
    int rows, k, panels, add;
};

static void gemm_part(void *arg, int part, int parts) {
    const struct gemm_job *g = arg;
    int lo, hi;
    part_range(g->panels, part, parts, &lo, &hi);
    for (int j = lo; j < hi; ++j)
        gemm_panel(g->x, g->ldx, g->rows, g->p + (int64_t)j * g->k * NR, g->k, g->y + j * NR, g->ldy,
                   g->bias ? g->bias + j * NR : NULL, g->add,
                   g->rows > MR && j + 1 < hi ? g->p + (int64_t)(j + 1) * g->k * NR : NULL);
}

void gemm_packed(const float *x, int m, int k, int64_t ldx, const float *p, int n, float *y, int64_t ldy,
                 const float *bias, int add, int threads) {
    for (int r0 = 0; r0 < m; r0 += MB) {
        struct gemm_job job = {x + r0 * ldx, p, bias, y + r0 * ldy, ldx, ldy, m - r0 < MB ? m - r0 : MB, k, n / NR, add};
        run_parts(gemm_part, &job, threads);
    }
}
