/* gemm_packed: y[m, n] (+)= x[m, k] @ w.T (+ bias) for a weight w[n, k] stored as panels
 * p[n / 16][k][16]. Each 16-column panel stays in cache while every row tile of x (6 rows: 12
 * accumulators) passes over it, a chunk of k at a time, and with several tiles those passes
 * prefetch the next panel, so small-m GEMMs (decode) stream the weights at memory speed and
 * large-m ones run at the FMA rate. The threads take runs of panels from a shared counter. */
#include <stdatomic.h>

#include "kernels.h"

#define NR 16 /* panel width: two 8-float vectors; one k step of a panel is one 64-byte line */
#define MR 6  /* rows per tile */
#ifndef MB
#define MB 192 /* rows per block (a multiple of MR) */
#endif
#ifndef KC
#define KC 64 /* k steps per chunk when several tiles share a panel */
#endif
#define CHUNKED_ROWS (3 * MR)

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

/* One row against one panel (decode at batch 1), with four partial sums over k steps
 * i = 4 j + s added at the end: a tile's two FMA chains per row bind one row's loop to the
 * FMA latency and keep too few lines in flight (over the model's weights on one core, 16.5
 * GB/s with one sum, 18.4 with four, against 18.8 for a plain read). */
static void gemv_panel(const float *x, const float *p, int k, float *y, const float *bias, int add) {
    __m256 acc[4][2];
    for (int s = 0; s < 4; ++s) acc[s][0] = acc[s][1] = _mm256_setzero_ps();
    if (add) {
        acc[0][0] = _mm256_loadu_ps(y);
        acc[0][1] = _mm256_loadu_ps(y + 8);
    }
    if (bias) {
        acc[1][0] = _mm256_loadu_ps(bias);
        acc[1][1] = _mm256_loadu_ps(bias + 8);
    }
    int i = 0;
    for (; i + 4 <= k; i += 4) {
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
            const __m256 b = _mm256_broadcast_ss(x + i + s);
            acc[s][0] = _mm256_fmadd_ps(b, _mm256_load_ps(p + (int64_t)(i + s) * NR), acc[s][0]);
            acc[s][1] = _mm256_fmadd_ps(b, _mm256_load_ps(p + (int64_t)(i + s) * NR + 8), acc[s][1]);
        }
    }
    for (; i < k; ++i) {
        const __m256 b = _mm256_broadcast_ss(x + i);
        acc[0][0] = _mm256_fmadd_ps(b, _mm256_load_ps(p + (int64_t)i * NR), acc[0][0]);
        acc[0][1] = _mm256_fmadd_ps(b, _mm256_load_ps(p + (int64_t)i * NR + 8), acc[0][1]);
    }
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_add_ps(acc[0][0], acc[1][0]), _mm256_add_ps(acc[2][0], acc[3][0])));
    _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_add_ps(acc[0][1], acc[1][1]), _mm256_add_ps(acc[2][1], acc[3][1])));
}

/* One tile of 0 < rows <= MR rows, its height made a constant for gemm_tile. */
static inline __attribute__((always_inline)) void tile_rows(const float *x, int64_t ldx, int rows, const float *p,
                                                            int k, float *y, int64_t ldy, const float *bias, int add,
                                                            const float *pf, int pf_lines) {
    switch (rows) {
    case 6: gemm_tile(x, ldx, p, k, y, ldy, bias, add, pf, pf_lines, 6); break;
    case 5: gemm_tile(x, ldx, p, k, y, ldy, bias, add, pf, pf_lines, 5); break;
    case 4: gemm_tile(x, ldx, p, k, y, ldy, bias, add, pf, pf_lines, 4); break;
    case 3: gemm_tile(x, ldx, p, k, y, ldy, bias, add, pf, pf_lines, 3); break;
    case 2: gemm_tile(x, ldx, p, k, y, ldy, bias, add, pf, pf_lines, 2); break;
    case 1: gemm_tile(x, ldx, p, k, y, ldy, bias, add, pf, pf_lines, 1); break;
    default: break;
    }
}

/* All m rows against one panel. One tile (m <= MR) makes one pass, without prefetching: the
 * hardware prefetcher keeps up with that (measured faster), and one row is a GEMV. Several
 * tiles prefetch the next panel between them along the way. Up to CHUNKED_ROWS rows they
 * take the panel KC k steps at a time, adding into y after the first chunk: a 4 KB chunk
 * stays in L1 while every tile passes over it (10-16% faster at 8 and 16 rows than passes
 * over the whole 36 KB panel of a 576-wide weight, read from L2 for each tile). With more
 * rows the extra y loads and stores cost more than that gains (32 rows 9% slower, prefill
 * 15-25%), and the tiles pass over the whole panel. */
static void gemm_panel(const float *x, int64_t ldx, int m, const float *p, int k, float *y, int64_t ldy,
                       const float *bias, int add, const float *next) {
    if (m <= MR) {
        if (m == 1) gemv_panel(x, p, k, y, bias, add);
        else tile_rows(x, ldx, m, p, k, y, ldy, bias, add, NULL, 0);
        return;
    }
    const int tiles = (m + MR - 1) / MR, chunk = m <= CHUNKED_ROWS ? KC : k;
    for (int k0 = 0; k0 < k; k0 += chunk) {
        const int kc = k - k0 < chunk ? k - k0 : chunk, share = (kc + tiles - 1) / tiles;
        const float *pc = p + (int64_t)k0 * NR, *b = k0 ? NULL : bias;
        const float *nc = next ? next + (int64_t)k0 * NR : NULL;
        const int ad = add || k0;
        int r = 0, t = 0;
        for (; r + MR <= m; r += MR, ++t) {
            const int lo = t * share, lines = nc && lo < kc ? (kc - lo < share ? kc - lo : share) : 0;
            gemm_tile(x + r * ldx + k0, ldx, pc, kc, y + r * ldy, ldy, b, ad, lines ? nc + (int64_t)lo * NR : NULL,
                      lines, MR);
        }
        const int lo = t * share, lines = nc && lo < kc ? kc - lo : 0;
        const float *xr = x + r * ldx + k0, *pf = lines ? nc + (int64_t)lo * NR : NULL;
        float *yr = y + r * ldy;
        tile_rows(xr, ldx, m - r, pc, kc, yr, ldy, b, ad, pf, lines);
    }
}

/* x: m rows of k floats, ldx apart; p: n / 16 panels (n a multiple of 16, 32-byte aligned);
 * y: m rows of n floats, ldy apart, overwritten (add = 0) or added to (add = 1); bias: n
 * floats or NULL. Rows go in blocks of MB, each block (in L2) passing over every panel before
 * the next, so a prefill chunk streams its rows from L2 rather than re-reading all of x from
 * memory for each panel.
 *
 * The threads take runs of panels from a shared counter, each run 1 / (2 parts) of the panels
 * left and at least `unit` (panels / (8 threads)): long runs first, so the next-panel
 * prefetch rarely breaks, and short ones at the end, so the threads finish together. With
 * fixed halves the caller waited 4-6 ms of a 52 ms batch-16 step at 2 threads for a worker
 * whose half ran 5-8% slower on these VMs; with runs it waits 1.3-1.6 ms. */
#define MIN_RUNS_PER_THREAD 8

struct gemm_job {
    const float *x, *p, *bias;
    float *y;
    int64_t ldx, ldy;
    int rows, k, panels, add, unit;
    _Atomic int next; /* the first panel of the next run to take */
};

static void gemm_part(void *arg, int part, int parts) {
    (void)part;
    struct gemm_job *g = arg;
    for (;;) {
        int lo = atomic_load_explicit(&g->next, memory_order_relaxed), hi;
        do {
            if (lo >= g->panels) return;
            const int left = g->panels - lo, size = left / (2 * parts) > g->unit ? left / (2 * parts) : g->unit;
            hi = lo + (size < left ? size : left);
        } while (!atomic_compare_exchange_weak_explicit(&g->next, &lo, hi, memory_order_relaxed, memory_order_relaxed));
        for (int j = lo; j < hi; ++j)
            gemm_panel(g->x, g->ldx, g->rows, g->p + (int64_t)j * g->k * NR, g->k, g->y + j * NR, g->ldy,
                       g->bias ? g->bias + j * NR : NULL, g->add,
                       g->rows > MR && j + 1 < hi ? g->p + (int64_t)(j + 1) * g->k * NR : NULL);
    }
}

void gemm_packed(const float *x, int m, int k, int64_t ldx, const float *p, int n, float *y, int64_t ldy,
                 const float *bias, int add, int threads) {
    const int panels = n / NR, unit = threads > 1 ? panels / (threads * MIN_RUNS_PER_THREAD) : panels;
    for (int r0 = 0; r0 < m; r0 += MB) {
        struct gemm_job job = {x + r0 * ldx, p, bias, y + r0 * ldy, ldx, ldy, m - r0 < MB ? m - r0 : MB, k, panels,
                               add, unit > 1 ? unit : 1, 0};
        run_parts(gemm_part, &job, threads);
    }
}
