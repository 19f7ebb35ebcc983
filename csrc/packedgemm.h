/* Packed GEMM for large products, without BLAS.
 *
 * Why: smallgemm.h reads its operands in place, which is fastest while they
 * sit in L1/L2 but not once a layer is a few thousand wide (256 x 2048 x
 * 2048).  There BLAS's design wins: copy ("pack") blocks of both operands
 * into the order the inner kernel reads them, so it streams contiguous,
 * cache-resident panels.  OpenBLAS does that, but the wheels' build runs
 * its AVX2 kernels on the project machine (an AMD EPYC with AVX-512), at
 * about half the multiply-add rate of 64-byte vectors.  This is the same
 * design with the 64-byte kernels of smallgemm.h's dispatch.
 *
 * Design (BLIS): for each NC-column block of C and KC-deep block of the
 * shared dimension, op(B)'s block is packed into NR-column panels; for
 * each MC-row block, op(A)'s into MR-row panels; then a register-blocked
 * kernel computes MR x NR tiles of C (MR x NR / lanes vector accumulators,
 * A broadcast against B's vectors).  A B panel (KC x NR) stays in L1, the
 * packed A block in L2, the packed B block in L2/L3.  Packing either
 * operand from its transpose is an 8 x 8 register transpose, so all of
 * NN, TN, NT (and TT) go through one kernel.
 *
 * Each entry of C is one chain of multiply-adds over the shared dimension
 * in order (the kernel accumulates onto C across KC blocks), so it does not
 * depend on the shape, the blocking or where a call's C starts: computing
 * column (or row) ranges of C in separate calls, as the threaded caller
 * does, gives bitwise the same result as one call.
 *
 * Single-threaded.  The packing buffer is per thread, grown when a call
 * needs more and otherwise kept (never freed per call).
 */
#ifndef FASTBP_PACKEDGEMM_H
#define FASTBP_PACKEDGEMM_H

#include "smallgemm.h"

#ifndef FBP_VECTORS
static inline int fbp_gemm_packed_isa_f32(int isa, int ta, int tb, int m, int n, int k,
                                          const float *a, int lda, const float *b, int ldb,
                                          float *c, int ldc) { return 0; }
static inline int fbp_gemm_packed_isa_f64(int isa, int ta, int tb, int m, int n, int k,
                                          const double *a, int lda, const double *b, int ldb,
                                          double *c, int ldc) { return 0; }
#else

#include <stdlib.h>
#include <stdint.h>

/* This thread's packing buffer, 64-byte aligned, of at least `bytes`
 * (NULL when that cannot be allocated).  Grown when a call needs more,
 * otherwise kept; freed when the thread exits (a pthread key's
 * destructor), so Python threads that each train once leave nothing
 * behind. */
#if defined(_WIN32)
static void fbp_pg_keep(void *raw) { (void)raw; }   /* freed at process exit */
#else
#include <pthread.h>
static pthread_key_t fbp_pg_key;
static pthread_once_t fbp_pg_once = PTHREAD_ONCE_INIT;
static void fbp_pg_make_key(void) { pthread_key_create(&fbp_pg_key, free); }
static void fbp_pg_keep(void *raw)
{
    pthread_once(&fbp_pg_once, fbp_pg_make_key);
    pthread_setspecific(fbp_pg_key, raw);
}
#endif

static void *fbp_pg_buffer(size_t bytes)
{
    static __thread char *raw;
    static __thread size_t cap;
    if (bytes > cap) {
        char *p = (char *)malloc(bytes + 64);
        if (!p)
            return NULL;
        free(raw);
        raw = p;
        cap = bytes;
        fbp_pg_keep(raw);
    }
    return (void *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
}

/* Blocking per element type: MR rows x NV vectors of accumulators, then
 * KC, MC, NC in elements; measured on the project machine (Zen 5: 48 KB
 * L1D, 1 MB L2 per core).  With AVX-512 a B panel is 32 KB (L1) and an A
 * block 256 KB (L2); float's 8 x 2 and double's 4 x 4 tiles (16 of the 32
 * registers) measured best, 6 x 4, 12 x 2 and 14 x 2 no better.  The
 * AVX2 level only matches OpenBLAS's own AVX2 kernels, and the baseline
 * (no FMA) is 3-4x slower than it: they are there for correctness and
 * for machines without BLAS of that quality, not for speed. */
#define PG_ATTR
#define PG_ISA base
#define PG_BYTES 32
#define PG_F32 4, 1, 256, 128, 1024
#define PG_F64 4, 1, 128, 128, 1024
#include "packedgemm_impl.h"

#ifdef FBP_X86_DISPATCH
#define PG_ATTR __attribute__((target("avx2,fma")))
#define PG_ISA avx2
#define PG_BYTES 32
#ifndef FBP_PG_AVX2_F32   /* (tuning hook) */
#define FBP_PG_AVX2_F32 4, 3, 256, 144, 1024
#define FBP_PG_AVX2_F64 4, 3, 256, 96, 1024
#endif
#define PG_F32 FBP_PG_AVX2_F32
#define PG_F64 FBP_PG_AVX2_F64
#include "packedgemm_impl.h"

#define PG_ATTR __attribute__((target("avx512f,avx2,fma")))
#define PG_ISA avx512
#define PG_BYTES 64
#ifndef FBP_PG_F32   /* (tuning hook) */
#define FBP_PG_F32 8, 2, 256, 256, 2048
#define FBP_PG_F64 4, 4, 128, 256, 2048
#endif
#define PG_F32 FBP_PG_F32
#define PG_F64 FBP_PG_F64
#include "packedgemm_impl.h"

#define FBP_PG_DISPATCH(ty, isa, args)                              \
    ((isa) >= FBP_ISA_AVX512 ? pg_gemm_##ty##_avx512 args :        \
     (isa) == FBP_ISA_AVX2 ? pg_gemm_##ty##_avx2 args :            \
     pg_gemm_##ty##_base args)
#else
#define FBP_PG_DISPATCH(ty, isa, args) pg_gemm_##ty##_base args
#endif

/* Row-major C[m, n] = op(A) @ op(B); C is overwritten (beta = 0).
 * lda, ldb, ldc are row-major leading dimensions (row lengths as stored),
 * op(A) is A or A.T per trans_a (A stored k x m when transposed), likewise
 * B.  isa as in fbp_gemm_small_isa_* (clamped to the machine's; -1 = best).
 * Returns 1 when done, 0 when declined (nothing written): an empty shape,
 * or no memory for the packing buffer. */
static inline int fbp_gemm_packed_isa_f32(int isa, int trans_a, int trans_b, int m, int n,
                                          int k, const float *a, int lda, const float *b,
                                          int ldb, float *c, int ldc)
{
    if (isa < 0 || isa > fbp_isa_best())
        isa = fbp_isa_best();
    return FBP_PG_DISPATCH(f32, isa, (trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc));
}

static inline int fbp_gemm_packed_isa_f64(int isa, int trans_a, int trans_b, int m, int n,
                                          int k, const double *a, int lda, const double *b,
                                          int ldb, double *c, int ldc)
{
    if (isa < 0 || isa > fbp_isa_best())
        isa = fbp_isa_best();
    return FBP_PG_DISPATCH(f64, isa, (trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc));
}

#endif  /* vector extensions */

#endif
