/* The engine's GEMM: which kernel takes a product, and how it is split
 * across the worker pool.
 *
 * fbp_gemm_<ty>(threads, ...) computes row-major C = op(A) @ op(B) with our
 * own kernels, or returns 0 so that the caller (gemm_rm in dense.pyx) uses
 * BLAS:
 *   - the small kernels (smallgemm.h) take what fits in cache;
 *   - the packed kernels (packedgemm.h) take the rest where the CPU has
 *     AVX-512, whose 64-byte multiply-adds beat the AVX2 kernels OpenBLAS
 *     runs there; elsewhere BLAS does (its AVX2 kernels are as good as
 *     ours);
 *   - with more than one thread allowed, a product of more than
 *     FBP_PAR_MNK multiply-adds is cut into column or row ranges of C, one
 *     per thread, each run on the path planned for the whole product, so
 *     the result is bitwise the same on any thread count (every entry is
 *     one chain of multiply-adds whatever range it falls in: small_plan in
 *     smallgemm_impl.h, and packedgemm.h).  A packed product whose ranges
 *     fit the small kernels runs them there instead when their path is a
 *     broadcast form, which chains each entry's multiply-adds the same way
 *     (fbp_small_ranges).
 * Small-kernel ranges are cut at multiples of 16 and hold at least
 * FBP_PAR_MIN columns (or rows), so each keeps full vector blocks; the
 * narrow paths, which vectorize along C's rows, and C too narrow for one
 * column range per thread, are cut into row ranges.  Packed ranges are cut
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
#define FBP_PAR_MIN (2 * FBP_PAR_UNIT)
#define FBP_PACKED_UNIT 32

/* path values beyond smallgemm.h's FBP_SG_* */
#define FBP_PACKED 16

struct fbp_gemm_job {
    int isa, path, trans_a, trans_b, m, n, k, parts, by_rows, dbl, unit;
    int failed;     /* a packed range could not get its buffer */
    const void *a, *b;
    void *c;
    int lda, ldb, ldc;
};

/* Start of range i of `parts` over an axis of len, in units of `unit`. */
static inline int fbp_range_start(int i, int parts, int len, int unit)
{
    long units = (len + unit - 1) / unit;
    int at = (int)(units * i / parts) * unit;
    return at < len ? at : len;
}

/* Range `task` of the product: rows [lo, hi) of C (narrow paths) or
 * columns [lo, hi) (the others). */
static void fbp_gemm_task(void *ctx, int task)
{
    struct fbp_gemm_job *j = (struct fbp_gemm_job *)ctx;
    int len = j->by_rows ? j->m : j->n;
    int lo = fbp_range_start(task, j->parts, len, j->unit);
    int hi = fbp_range_start(task + 1, j->parts, len, j->unit);
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
            __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
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
    if (path == FBP_SG_NONE && isa >= FBP_ISA_AVX512 && !(trans_a && trans_b))
        path = FBP_PACKED;
    return path;
}

/* Whether a small-kernel path computes each entry of C as one chain of
 * multiply-adds over the shared dimension in order, as the packed kernels
 * do: the broadcast forms (the dot forms add lane-wise partial sums).  Such
 * a path gives bitwise the packed kernels' result. */
static inline int fbp_sg_chain(int path)
{
    return path == FBP_SG_BCAST || path == FBP_SG_TN_NARROW || path == FBP_SG_NT_COPY;
}

/* A product too large for the small kernels can still be cut into ranges
 * small enough for them, which skip the packing: 200 x 100 x 64 float64 in
 * two ranges took 12.6 us a range on the small kernels against 19.8
 * packed.  Where the small kernels' path for the largest range is a chain
 * path, every range takes it (same bits as packed, so the thread count
 * still changes nothing), cut as the small paths are cut: in column ranges
 * (by_rows 0) or row ranges.  Returns 1 and sets the split if so. */
static int fbp_small_ranges(struct fbp_gemm_job *j, int threads, int by_rows)
{
    int len = by_rows ? j->m : j->n, parts = len / FBP_PAR_MIN, big = 0;
    if (parts > threads)
        parts = threads;
    if (parts < 2)
        return 0;
    for (int i = 0; i < parts; i++) {
        int w = fbp_range_start(i + 1, parts, len, FBP_PAR_UNIT)
              - fbp_range_start(i, parts, len, FBP_PAR_UNIT);
        big = w > big ? w : big;
    }
    int mm = by_rows ? big : j->m, nn = by_rows ? j->n : big;
    int sub = j->dbl ? fbp_small_plan_f64(j->isa, j->trans_a, j->trans_b, mm, nn, j->k)
                     : fbp_small_plan_f32(j->isa, j->trans_a, j->trans_b, mm, nn, j->k);
    if (!fbp_sg_chain(sub) || (!by_rows && sub == FBP_SG_TN_NARROW))
        return 0;
    j->path = sub;
    j->by_rows = by_rows;
    j->unit = FBP_PAR_UNIT;
    j->parts = parts;
    return 1;
}

/* Shared body of fbp_gemm_f32 / _f64 once the path is known. */
static int fbp_gemm_split(struct fbp_gemm_job *j, int threads)
{
    int len;
    j->parts = 1;
    if (j->path == FBP_PACKED && threads > 1 && (long)j->m * j->n * j->k > FBP_PAR_MNK
        && (fbp_small_ranges(j, threads, 0) || fbp_small_ranges(j, threads, 1))) {
        /* the split is set: small-kernel ranges */
    } else if (j->path == FBP_PACKED) {
        /* Each range packs all of the operand it shares with the others:
         * op(A) (m x k) for column ranges, op(B) (k x n) for row ranges.
         * Share the smaller one. */
        j->by_rows = j->m > j->n;
        j->unit = j->by_rows ? FBP_PAR_UNIT : FBP_PACKED_UNIT;
        len = j->by_rows ? j->m : j->n;
        if (threads > 1 && (long)j->m * j->n * j->k > FBP_PAR_MNK)
            j->parts = (len + j->unit - 1) / j->unit;
    } else {
        /* Narrow paths vectorize along C's rows, so they are cut in row
         * ranges; the others in column ranges, or in row ranges when C is
         * too narrow for one column range per thread. */
        int narrow = j->path == FBP_SG_TN_NARROW || j->path == FBP_SG_NN_NARROW;
        int col_parts = narrow ? 0 : j->n / FBP_PAR_MIN, row_parts = j->m / FBP_PAR_MIN;
        j->by_rows = narrow || (col_parts < threads && row_parts > col_parts);
        j->unit = FBP_PAR_UNIT;
        len = j->by_rows ? j->m : j->n;
        if (threads > 1 && (long)j->m * j->n * j->k > FBP_PAR_MNK)
            j->parts = len / FBP_PAR_MIN;
    }
    if (j->parts > threads)
        j->parts = threads;
    if (j->parts < 1)
        j->parts = 1;
    if (j->parts == 1)
        fbp_gemm_task(j, 0);
    else
        fbp_pool_run(j->parts, fbp_gemm_task, j, j->parts);
    return !j->failed;   /* else BLAS redoes all of C */
}

/* Row-major C[m, n] = op(A) @ op(B) (C overwritten) on up to `threads`
 * threads; 0 when BLAS should take it (C may then be partly written: BLAS
 * overwrites all of it). */
static inline int fbp_gemm_f32(int threads, int trans_a, int trans_b, int m, int n, int k,
                               const float *a, int lda, const float *b, int ldb,
                               float *c, int ldc)
{
    int isa = fbp_isa_best();
    struct fbp_gemm_job j = {
        .isa = isa, .path = fbp_gemm_plan(isa, 0, trans_a, trans_b, m, n, k),
        .trans_a = trans_a, .trans_b = trans_b, .m = m, .n = n, .k = k, .dbl = 0,
        .a = a, .b = b, .c = c, .lda = lda, .ldb = ldb, .ldc = ldc};
    return j.path != FBP_SG_NONE && fbp_gemm_split(&j, threads);
}

static inline int fbp_gemm_f64(int threads, int trans_a, int trans_b, int m, int n, int k,
                               const double *a, int lda, const double *b, int ldb,
                               double *c, int ldc)
{
    int isa = fbp_isa_best();
    struct fbp_gemm_job j = {
        .isa = isa, .path = fbp_gemm_plan(isa, 1, trans_a, trans_b, m, n, k),
        .trans_a = trans_a, .trans_b = trans_b, .m = m, .n = n, .k = k, .dbl = 1,
        .a = a, .b = b, .c = c, .lda = lda, .ldb = ldb, .ldc = ldc};
    return j.path != FBP_SG_NONE && fbp_gemm_split(&j, threads);
}

#endif
