/* The engine's GEMM: which kernel takes a product, and how it is split
 * across the worker pool.
 *
 * fbp_gemm_<ty>(threads, ...) computes row-major C = op(A) @ op(B) with our
 * own kernels, or returns 0 so that the caller (gemm_rm in dense.pyx) uses
 * BLAS:
 *   - the small kernels (smallgemm.h) take what fits in cache;
 *   - the packed kernels (packedgemm.h) take the rest at the AVX2 and
 *     AVX-512 levels: they match or beat OpenBLAS there (packedgemm.h has
 *     the figures), and being ours they give the same bits on any thread
 *     count; at the baseline level (no FMA) BLAS does, which is 3-4x
 *     faster than our kernels without FMA;
 *   - with more than one thread allowed, a product of more than
 *     FBP_PAR_MNK multiply-adds is cut into column or row ranges of C, one
 *     per thread, each run on the path planned for the whole product, so
 *     the result is bitwise the same on any thread count (every entry is
 *     one chain of multiply-adds whatever range it falls in: small_plan in
 *     smallgemm_impl.h, and packedgemm.h).  A packed product whose ranges
 *     fit the small kernels runs them there instead on their broadcast
 *     form, which chains each entry's multiply-adds the same way
 *     (fbp_small_ranges).
 * Small-kernel ranges are cut in whole blocks of the kernel, along the
 * axis that balances blocks best (fbp_small_split); the narrow paths,
 * which vectorize along C's rows, in row ranges.  Packed ranges are cut
 * at multiples of the tile width (32): an edge tile costs a whole tile, so
 * this balances tiles rather than columns.  Each packed range packs all of
 * the operand it shares with the others (op(A) for column ranges, op(B)
 * for row ranges), so C is cut along its longer side.
 * If a packed range cannot get its buffer (out of memory) the call returns
 * 0 and BLAS recomputes all of C.
 */
#ifndef FASTBP_GEMM_H
#define FASTBP_GEMM_H

#include "smallgemm.h"
#include "packedgemm.h"
#include "pool.h"

/* Up to this a product takes a microsecond or two (32 x 64 x 64 float32:
 * 1.2 us): handing half of it to a worker costs about as much as it
 * saves. */
#ifndef FBP_PAR_MNK
#define FBP_PAR_MNK (1L << 17)
#endif
#define FBP_PAR_UNIT 16
#define FBP_PACKED_UNIT 32

/* path values beyond smallgemm.h's FBP_SG_* */
#define FBP_PACKED 16

/* A packed range records that it could not get its buffer; ranges may run
 * on several threads.  Without the vector kernels (MSVC) nothing is packed
 * and this is never reached, but it must still compile. */
#ifdef FBP_VECTORS
#define FBP_SET_FAILED(j) __atomic_store_n(&(j)->failed, 1, __ATOMIC_RELAXED)
#else
#define FBP_SET_FAILED(j) ((j)->failed = 1)
#endif

struct fbp_gemm_job {
    int isa, path, trans_a, trans_b, m, n, k, parts, by_rows, dbl, unit;
    int failed;     /* a packed range could not get its buffer */
    const void *a, *b;
    void *c;
    int lda, ldb, ldc;
};
typedef struct fbp_gemm_job fbp_gemm_job;

/* Start of range i of `parts` over an axis of len, in units of `unit`
 * shared out evenly.  A partial unit at the end counts as a unit of its
 * own if `partial` (packed tiles: an edge tile costs a whole one), else
 * the last range takes it on top of its whole units (a small-kernel
 * range narrower than a block would lose its vector blocks); then no range
 * is narrower than a unit if parts <= len / unit, and the last one is the
 * largest. */
static inline int fbp_range_start(int i, int parts, int len, int unit, int partial)
{
    long units = partial ? (len + unit - 1) / unit : len / unit;
    return i >= parts ? len : (int)(units * i / parts) * unit;
}

/* Units (rounded up) in the largest of `parts` whole-unit ranges over len. */
static inline long fbp_largest_range(int len, int unit, int parts)
{
    return (len - fbp_range_start(parts - 1, parts, len, unit, 0) + unit - 1) / unit;
}

/* Range `task` of the product: rows [lo, hi) of C (by_rows) or columns
 * [lo, hi). */
static void fbp_gemm_task(void *ctx, int task)
{
    struct fbp_gemm_job *j = (struct fbp_gemm_job *)ctx;
    int len = j->by_rows ? j->m : j->n;
    int partial = j->path == FBP_PACKED;
    int lo = fbp_range_start(task, j->parts, len, j->unit, partial);
    int hi = fbp_range_start(task + 1, j->parts, len, j->unit, partial);
    long ao = 0, bo = 0, co;
    int m = j->m, n = j->n;
    if (j->by_rows) {
        m = hi - lo;
        ao = j->trans_a ? lo : (long)lo * j->lda;   /* rows of op(A) */
        co = (long)lo * j->ldc;
    } else {
        n = hi - lo;
        bo = j->trans_b ? (long)lo * j->ldb : lo;   /* columns of op(B) */
        co = lo;
    }
    if (j->path == FBP_PACKED) {
        /* Each range packs its own blocks; the result does not depend on
         * the ranges (packedgemm.h). */
        int done;
        if (j->dbl)
            done = fbp_gemm_packed_isa_f64(j->isa, j->trans_a, j->trans_b, m, n, j->k,
                                           (const double *)j->a + ao, j->lda,
                                           (const double *)j->b + bo, j->ldb,
                                           (double *)j->c + co, j->ldc);
        else
            done = fbp_gemm_packed_isa_f32(j->isa, j->trans_a, j->trans_b, m, n, j->k,
                                           (const float *)j->a + ao, j->lda,
                                           (const float *)j->b + bo, j->ldb,
                                           (float *)j->c + co, j->ldc);
        if (!done)
            FBP_SET_FAILED(j);
    } else if (j->dbl)
        fbp_small_run_f64(j->isa, j->path, j->trans_a, m, n, j->k,
                          (const double *)j->a + ao, j->lda, (const double *)j->b + bo,
                          j->ldb, (double *)j->c + co, j->ldc);
    else
        fbp_small_run_f32(j->isa, j->path, j->trans_a, m, n, j->k,
                          (const float *)j->a + ao, j->lda, (const float *)j->b + bo,
                          j->ldb, (float *)j->c + co, j->ldc);
}

/* The small kernels' path for a product, else FBP_PACKED where the packed
 * kernels should take it, else FBP_SG_NONE (BLAS). */
static inline int fbp_gemm_plan(int isa, int dbl, int trans_a, int trans_b,
                                int m, int n, int k)
{
    int path = dbl ? fbp_small_plan_f64(isa, trans_a, trans_b, m, n, k)
                   : fbp_small_plan_f32(isa, trans_a, trans_b, m, n, k);
    if (path == FBP_SG_NONE && isa >= FBP_ISA_AVX2 && !(trans_a && trans_b))
        path = FBP_PACKED;
    return path;
}

/* Lanes of the small kernels' vectors for the job's type and level. */
static inline int fbp_small_lanes(const struct fbp_gemm_job *j)
{
    return (j->isa >= FBP_ISA_AVX512 ? 64 : 32) / (j->dbl ? 8 : 4);
}

/* Rows and columns of C in a block of the small kernels on a path, as
 * the unit of a split: the broadcast form's 8-row x 2-vector blocks (one
 * vector when C is narrower than two), the narrow A.T @ B path's blocks of
 * C.T (whose columns are C's rows), and 16 for the dot forms (blocks of
 * 2 x 4 entries, too small to matter). */
static inline void fbp_small_block(const struct fbp_gemm_job *j, int path, int *ru, int *cu)
{
    int vl = fbp_small_lanes(j);
    *ru = *cu = FBP_PAR_UNIT;
    if (path == FBP_SG_BCAST || path == FBP_SG_NT_COPY) {
        *ru = 8;
        *cu = j->n >= 2 * vl ? 2 * vl : vl;
    } else if (path == FBP_SG_TN_NARROW) {
        *ru = 2 * vl;
    }
}

/* Splits a product on small path `path` across up to `threads`: along the
 * axis whose largest range has the fewest blocks (200 x 100 float64 on two
 * threads: rows 96 + 104, 13 x 7 blocks, rather than columns 48 + 52,
 * 25 x 4).  The narrow paths, vectorized along C's rows, are cut in rows. */
static void fbp_small_split(struct fbp_gemm_job *j, int path, int threads)
{
    int ru, cu, narrow = path == FBP_SG_TN_NARROW || path == FBP_SG_NN_NARROW;
    fbp_small_block(j, path, &ru, &cu);
    int pr = j->m / ru, pc = narrow ? 1 : j->n / cu;
    pr = pr < 1 ? 1 : pr > threads ? threads : pr;
    pc = pc < 1 ? 1 : pc > threads ? threads : pc;
    long rows = fbp_largest_range(j->m, ru, pr) * ((j->n + cu - 1) / cu);
    long cols = fbp_largest_range(j->n, cu, pc) * ((j->m + ru - 1) / ru);
    j->path = path;
    j->by_rows = narrow || rows < cols;
    j->unit = j->by_rows ? ru : cu;
    j->parts = j->by_rows ? pr : pc;
}

/* A product too large for the small kernels can still be cut into ranges
 * small enough for them, which skip the packing (256 x 256 x 300 float32
 * in two column ranges: 82-87 us a range against 89-98 packed).  The
 * candidate is the broadcast form for the product's transposes: like the
 * packed kernels, it computes each entry of C as one chain of multiply-adds
 * over the shared dimension in order (the dot forms add lane-wise partial
 * sums), so the two give bitwise the same C.  If the small kernels take the
 * largest range on that form, every range runs it, and the thread count
 * still changes nothing.  Returns 1 with the split set if so. */
static int fbp_small_ranges(struct fbp_gemm_job *j, int threads)
{
    int vl = fbp_small_lanes(j), form;
    if (j->trans_b)
        form = j->trans_a ? FBP_SG_NONE : FBP_SG_NT_COPY;
    else
        form = j->n >= vl ? FBP_SG_BCAST : j->trans_a ? FBP_SG_TN_NARROW : FBP_SG_NONE;
    if (form == FBP_SG_NONE)
        return 0;
    struct fbp_gemm_job t = *j;
    fbp_small_split(&t, form, threads);
    if (t.parts < 2)
        return 0;
    int len = t.by_rows ? t.m : t.n;
    int big = len - fbp_range_start(t.parts - 1, t.parts, len, t.unit, 0);   /* the last */
    int mm = t.by_rows ? big : t.m, nn = t.by_rows ? t.n : big;
    int sub = t.dbl ? fbp_small_plan_f64(t.isa, t.trans_a, t.trans_b, mm, nn, t.k)
                    : fbp_small_plan_f32(t.isa, t.trans_a, t.trans_b, mm, nn, t.k);
    if (sub != form)
        return 0;
    *j = t;
    return 1;
}

/* Plans row-major C[m, n] = op(A) @ op(B) (C overwritten; dbl: double,
 * else float) and its split across up to `threads`, without running it:
 * then fbp_gemm_task(j, i) for i < j->parts computes it, in any order on
 * any threads (the engine runs them inside jobs of its own), and j->failed
 * says if BLAS must redo all of C.  Returns 0 when BLAS should take the
 * product. */
static int fbp_gemm_prepare(struct fbp_gemm_job *j, int dbl, int threads, int trans_a,
                            int trans_b, int m, int n, int k, const void *a, int lda,
                            const void *b, int ldb, void *c, int ldc)
{
    int isa = fbp_isa_best();
    struct fbp_gemm_job init = {
        .isa = isa, .path = fbp_gemm_plan(isa, dbl, trans_a, trans_b, m, n, k),
        .trans_a = trans_a, .trans_b = trans_b, .m = m, .n = n, .k = k, .dbl = dbl,
        .parts = 1, .unit = 1, .a = a, .b = b, .c = c, .lda = lda, .ldb = ldb, .ldc = ldc};
    *j = init;
    if (j->path == FBP_SG_NONE)
        return 0;
    if (threads > 1 && (long)m * n * k > FBP_PAR_MNK) {
        if (j->path != FBP_PACKED)
            fbp_small_split(j, j->path, threads);
        else if (!fbp_small_ranges(j, threads)) {
            /* Each range packs all of the operand it shares with the
             * others: op(A) (m x k) for column ranges, op(B) (k x n) for
             * row ranges.  Share the smaller one. */
            j->by_rows = m > n;
            j->unit = j->by_rows ? FBP_PAR_UNIT : FBP_PACKED_UNIT;
            j->parts = ((j->by_rows ? m : n) + j->unit - 1) / j->unit;
            if (j->parts > threads)
                j->parts = threads;
        }
    }
    return 1;
}

/* Row-major C[m, n] = op(A) @ op(B) (C overwritten) on up to `threads`
 * threads; 0 when BLAS should take it (C may then be partly written: BLAS
 * overwrites all of it). */
static inline int fbp_gemm(int dbl, int threads, int trans_a, int trans_b, int m, int n, int k,
                           const void *a, int lda, const void *b, int ldb, void *c, int ldc)
{
    struct fbp_gemm_job j;
    if (!fbp_gemm_prepare(&j, dbl, threads, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc))
        return 0;
    if (j.parts < 2)
        fbp_gemm_task(&j, 0);
    else
        fbp_pool_run(j.parts, fbp_gemm_task, &j, j.parts);
    return !j.failed;   /* else BLAS redoes all of C */
}

static inline int fbp_gemm_f32(int threads, int trans_a, int trans_b, int m, int n, int k,
                               const float *a, int lda, const float *b, int ldb,
                               float *c, int ldc)
{
    return fbp_gemm(0, threads, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc);
}

static inline int fbp_gemm_f64(int threads, int trans_a, int trans_b, int m, int n, int k,
                               const double *a, int lda, const double *b, int ldb,
                               double *c, int ldc)
{
    return fbp_gemm(1, threads, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc);
}

/* Which kernels take a product: FBP_BY_SMALL, FBP_BY_PACKED or
 * FBP_BY_BLAS. */
#define FBP_BY_BLAS 0
#define FBP_BY_SMALL 1
#define FBP_BY_PACKED 2
static inline int fbp_gemm_kind(int dbl, int trans_a, int trans_b, int m, int n, int k)
{
    int path = fbp_gemm_plan(fbp_isa_best(), dbl, trans_a, trans_b, m, n, k);
    return path == FBP_SG_NONE ? FBP_BY_BLAS : path == FBP_PACKED ? FBP_BY_PACKED : FBP_BY_SMALL;
}

/* Rows [lo, hi) of row-major C[m, n] = A @ op(B) on the calling thread,
 * on the path planned for all m rows: each row comes out bitwise as it
 * does from fbp_gemm on any thread count (every path computes an entry
 * the same way whatever rows a call covers).  The engine runs a batch's
 * row ranges this way on different threads.  Returns 0 (C's rows perhaps
 * partly written) where BLAS should take the product, or a packed call
 * could not get its buffer. */
static int fbp_gemm_rows(int dbl, int trans_b, int m, int lo, int hi, int n, int k,
                         const void *a, int lda, const void *b, int ldb, void *c, int ldc)
{
    struct fbp_gemm_job j;
    if (!fbp_gemm_prepare(&j, dbl, 1, 0, trans_b, m, n, k, a, lda, b, ldb, c, ldc))
        return 0;
    size_t size = dbl ? sizeof(double) : sizeof(float);
    j.a = (const char *)a + (size_t)lo * lda * size;
    j.c = (char *)c + (size_t)lo * ldc * size;
    j.m = hi - lo;
    fbp_gemm_task(&j, 0);
    return !j.failed;
}

#endif
