/* Small GEMMs without BLAS.
 *
 * Why: a training step of a small network is a chain of tiny GEMMs (32 x 64
 * x 64 and smaller).  OpenBLAS reaches full FMA speed in its inner kernel
 * even there, but first copies ("packs") both operands into its own layout
 * and goes through its argument checks and dispatch: measured with perf on
 * the S workload (20-64-64-2, batch 32), packing alone was a third of
 * OpenBLAS's time.  Operands this small stay in L1, so register-blocked
 * loops that read them in place do the same arithmetic with none of that.
 *
 * Two loop shapes cover the three products the engine needs (row-major
 * C = A B, A.T B and A B.T):
 *   bcast: C's columns across vector lanes; one A element broadcast against
 *          a contiguous row of B (A may be read with any strides);
 *   dot:   the shared dimension across lanes; rows of A against rows of B,
 *          reduced across lanes at the end.
 * Shapes with few columns are transposed (C.T = B.T A.T) or have B copied
 * transposed into a small stack buffer, so a vector loop always runs over a
 * long contiguous axis.
 *
 * Written with GCC/Clang vector extensions and compiled three times on
 * x86-64: 64-byte vectors for AVX-512, 32-byte vectors for AVX2 + FMA, and
 * 16-byte vectors in the baseline instruction set; the first call picks
 * the best the CPU supports (fbp_isa_best), so a portable wheel still gets
 * the wide FMAs.  (On the project machine, an AMD EPYC whose OpenBLAS runs
 * its AVX2 "Haswell" kernels, AVX-512 doubles the multiply-add rate.)
 * Results differ from BLAS only in rounding (summation order, fused
 * multiply-add).
 */
#ifndef FASTBP_SMALLGEMM_H
#define FASTBP_SMALLGEMM_H

/* How the small kernels compute a product (small_plan in smallgemm_impl.h). */
#define FBP_SG_NONE 0        /* declined: BLAS (or the packed kernels) */
#define FBP_SG_BCAST 1       /* NN / TN, broadcast form across C's columns */
#define FBP_SG_TN_NARROW 2   /* TN with few columns, computed as C.T */
#define FBP_SG_NN_NARROW 3   /* NN with few columns: B.T copied, dot form */
#define FBP_SG_NT_DOT 4      /* NT, dot form along the shared dimension */
#define FBP_SG_NT_COPY 5     /* NT with a short shared dimension: B.T copied */

#include "platform.h"   /* FBP_VECTORS */

#ifndef FBP_VECTORS
/* No vector kernels (MSVC, MinGW, 32-bit targets; see platform.h): every
 * product goes to BLAS.  The level names stay defined for gemm.h. */
#include <stddef.h>
#define FBP_ISA_BASE 0
#define FBP_ISA_AVX2 1
#define FBP_ISA_AVX512 2
#define FBP_INLINE inline
#define FBP_CAT_(a, b) a##b
#define FBP_CAT(a, b) FBP_CAT_(a, b)
static inline int fbp_isa_detect(void) { return FBP_ISA_BASE; }
static inline int fbp_isa_best(void) { return FBP_ISA_BASE; }
static inline int fbp_small_plan_f32(int isa, int ta, int tb, int m, int n, int k)
{ return FBP_SG_NONE; }
static inline int fbp_small_plan_f64(int isa, int ta, int tb, int m, int n, int k)
{ return FBP_SG_NONE; }
static inline void fbp_small_run_f32(int isa, int path, int ta, int m, int n, int k,
                                     const float *a, int lda, const float *b, int ldb,
                                     float *c, int ldc) {}
static inline void fbp_small_run_f64(int isa, int path, int ta, int m, int n, int k,
                                     const double *a, int lda, const double *b, int ldb,
                                     double *c, int ldc) {}
static inline int fbp_gemm_small_isa_f32(int isa, int ta, int tb, int m, int n, int k,
                                         const float *a, int lda, const float *b, int ldb,
                                         float *c, int ldc) { return 0; }
static inline int fbp_gemm_small_isa_f64(int isa, int ta, int tb, int m, int n, int k,
                                         const double *a, int lda, const double *b, int ldb,
                                         double *c, int ldc) { return 0; }
#else

#include <stdlib.h>
#include <string.h>

/* The vector helpers are always inlined into entry points compiled for the
 * same instruction set, so the ABI note GCC gives for a wide vector
 * returned without AVX is moot. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

/* Where packing pays (packedgemm.h, or BLAS at the baseline level) once
 * operands no longer sit in cache.  Measured on the project machine (AMD
 * EPYC Zen 4, 1 thread):
 *   - baseline (no FMA): up to 96^3 multiply-adds, as before; BLAS beyond.
 *   - AVX-512, 8-row x 2-vector blocks: they beat the packed kernels on
 *     A @ B up to 2^24 multiply-adds while B (swept once per block of rows)
 *     stays in L2: 64 x 256 x 784 float32 123 against 188 us, 256 x 256 x
 *     256 148 against 193, 200 x 100 x 64 float64 27 against 35; at B of
 *     1 MB they lose (64 x 2048 x 128 float32: 234 against 183).  A.T @ B
 *     and A @ B.T are mixed above 2^22 (512 x 512 x 32 A.T @ B float64: 204
 *     against 158 us), so they stop there.
 *   - AVX2 (FASTBP_ISA=avx2; best of 9, GFLOP/s against the packed AVX2
 *     kernels, whose peak here is 117 float32 / 58.6 float64): with 4-row x
 *     2-vector blocks they win while C's rows are short and B fits in a
 *     Zen 3's 512 KB L2 (64 x 128 x 256 float32 98 against 86, 256 x 64 x
 *     512 99 against 81, digits' 200 x 100 x 64 float64 49 against 45,
 *     A.T @ B 256 x 128 x 64 96 against 85) and lose once rows reach 1 KB
 *     (128 x 256 x 128 88 against 99; A.T @ B 100 x 200 x 200 float64 32
 *     against 50) or B passes 256 KB (64 x 256 x 784: 74 against 95). */
#ifndef FBP_SMALL_MNK
#define FBP_SMALL_MNK (96L * 96L * 96L)
#endif
#ifndef FBP_WIDE_MNK
#define FBP_WIDE_MNK (1L << 24)
#endif
#ifndef FBP_WIDE_T_MNK
#define FBP_WIDE_T_MNK (1L << 22)
#endif
#define FBP_WIDE_SWEEP (7L << 17)   /* 896 KiB */
#ifndef FBP_AVX2_MNK
#define FBP_AVX2_MNK (1L << 24)
#endif
#ifndef FBP_AVX2_T_MNK
#define FBP_AVX2_T_MNK (1L << 22)
#endif
#ifndef FBP_AVX2_SWEEP
#define FBP_AVX2_SWEEP (1L << 18)   /* 256 KiB */
#endif
#ifndef FBP_AVX2_ROW
#define FBP_AVX2_ROW 1024L          /* bytes of a row of C */
#endif
#define FBP_NO_CAP (1L << 62)
/* The most bytes of A that the narrow A.T @ B path takes above the caps
 * (small_plan in smallgemm_impl.h). */
#ifndef FBP_NARROW_SWEEP
#define FBP_NARROW_SWEEP (8L << 20)
#endif
/* Everything is inlined into the entry points, so each instruction-set
 * variant gets its own vector code. */
#define FBP_INLINE inline __attribute__((always_inline))

/* Bytes of stack for a transposed copy of B. */
#define FBP_SMALL_TMP 16384

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define FBP_SHUFFLE __builtin_shufflevector
#endif

#ifdef FBP_SHUFFLE
/* Transposes 8 vectors of 8 elements of type V (r0..r7 rows in, columns
 * out) in the pattern of the classic AVX transpose: unpacks, 4-lane
 * shuffles, then half swaps, each one instruction on 8 floats (vunpcklps /
 * vunpckhps, vshufps, vperm2f128).  Written with named vectors, for the
 * compiler to keep them in registers. */
#define FBP_T8(V, r0, r1, r2, r3, r4, r5, r6, r7)                                  \
    do {                                                                           \
        V t0 = FBP_SHUFFLE(r0, r1, 0, 8, 1, 9, 4, 12, 5, 13);                      \
        V t1 = FBP_SHUFFLE(r0, r1, 2, 10, 3, 11, 6, 14, 7, 15);                    \
        V t2 = FBP_SHUFFLE(r2, r3, 0, 8, 1, 9, 4, 12, 5, 13);                      \
        V t3 = FBP_SHUFFLE(r2, r3, 2, 10, 3, 11, 6, 14, 7, 15);                    \
        V t4 = FBP_SHUFFLE(r4, r5, 0, 8, 1, 9, 4, 12, 5, 13);                      \
        V t5 = FBP_SHUFFLE(r4, r5, 2, 10, 3, 11, 6, 14, 7, 15);                    \
        V t6 = FBP_SHUFFLE(r6, r7, 0, 8, 1, 9, 4, 12, 5, 13);                      \
        V t7 = FBP_SHUFFLE(r6, r7, 2, 10, 3, 11, 6, 14, 7, 15);                    \
        V u0 = FBP_SHUFFLE(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);                      \
        V u1 = FBP_SHUFFLE(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);                    \
        V u2 = FBP_SHUFFLE(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);                      \
        V u3 = FBP_SHUFFLE(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);                    \
        V u4 = FBP_SHUFFLE(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);                      \
        V u5 = FBP_SHUFFLE(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);                    \
        V u6 = FBP_SHUFFLE(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);                      \
        V u7 = FBP_SHUFFLE(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);                    \
        r0 = FBP_SHUFFLE(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11);                        \
        r1 = FBP_SHUFFLE(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11);                        \
        r2 = FBP_SHUFFLE(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11);                        \
        r3 = FBP_SHUFFLE(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11);                        \
        r4 = FBP_SHUFFLE(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15);                      \
        r5 = FBP_SHUFFLE(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15);                      \
        r6 = FBP_SHUFFLE(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15);                      \
        r7 = FBP_SHUFFLE(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15);                      \
    } while (0)
#endif

/* Instruction-set levels, best last.  fbp_gemm_small_* pick the best one
 * the CPU (and OS) supports, once; the _isa entry points take it explicitly
 * (tests run every level the machine has). */
#define FBP_ISA_BASE 0     /* 16-byte vectors in the baseline instruction set */
#define FBP_ISA_AVX2 1     /* 32-byte vectors, AVX2 + FMA */
#define FBP_ISA_AVX512 2   /* 64-byte vectors, AVX-512F + FMA */

#define FBP_CAT_(a, b) a##b
#define FBP_CAT(a, b) FBP_CAT_(a, b)

/* Bytes of a vector at the baseline level: 16, the native width of both
 * x86-64's SSE2 and ARM64's NEON.  Vectors twice that wide had to be split
 * by the compiler, which on x86-64 went through memory: the small kernels
 * ran a 32 x 64 x 64 float32 product at 2.3 GFLOP/s (38 at 16 bytes), and
 * the peak probe, epilogues and losses likewise. */
#define FBP_BASE_BYTES 16

/* Each block instantiates the kernels for float and double at one level
 * (smallgemm_pair.h reads and then undefines these settings). */
#define SG_ATTR
#define SG_MNK_CAP FBP_SMALL_MNK
#define SG_T_MNK_CAP FBP_SMALL_MNK
#define SG_SWEEP_CAP FBP_WIDE_SWEEP
#define SG_ROW_CAP FBP_NO_CAP
#define SG_ROWS 4
#define SG_BYTES FBP_BASE_BYTES
#define SG_ISA base
#include "smallgemm_pair.h"

#if defined(__x86_64__) && !defined(FBP_NO_DISPATCH)
#define FBP_X86_DISPATCH 1

#define SG_ATTR __attribute__((target("avx2,fma")))
#define SG_MNK_CAP FBP_AVX2_MNK
#define SG_T_MNK_CAP FBP_AVX2_T_MNK
#define SG_SWEEP_CAP FBP_AVX2_SWEEP
#define SG_ROW_CAP FBP_AVX2_ROW
#ifndef FBP_AVX2_ROWS
#define FBP_AVX2_ROWS 6
#endif
#define SG_ROWS FBP_AVX2_ROWS
#define SG_BYTES 32
#define SG_ISA avx2
#include "smallgemm_pair.h"

#define SG_ATTR __attribute__((target("avx512f,avx2,fma")))
#define SG_MNK_CAP FBP_WIDE_MNK
#define SG_T_MNK_CAP FBP_WIDE_T_MNK
#define SG_SWEEP_CAP FBP_WIDE_SWEEP
#define SG_ROW_CAP FBP_NO_CAP
#define SG_ROWS 8
#define SG_BYTES 64
#define SG_ISA avx512
#include "smallgemm_pair.h"
#endif

#if defined(FBP_X86_DISPATCH) && defined(__APPLE__)
/* Apple's toolchain has no runtime for __builtin_cpu_supports: a module
 * using it would fail to import on an Intel Mac (___cpu_model, a symbol
 * nothing provides).  macOS reports the CPU's features, as far as it
 * enables them, through sysctl instead. */
#include <sys/sysctl.h>

static int fbp_sysctl_flag(const char *name)
{
    int value = 0;
    size_t size = sizeof value;
    return sysctlbyname(name, &value, &size, NULL, 0) == 0 && value;
}
#endif

/* The best level this machine runs (libgcc's CPU model, and macOS's
 * sysctl, also check that the OS saves the wider registers). */
static int fbp_isa_detect(void)
{
#if defined(FBP_X86_DISPATCH) && defined(__APPLE__)
    if (fbp_sysctl_flag("hw.optional.avx512f") && fbp_sysctl_flag("hw.optional.fma"))
        return FBP_ISA_AVX512;
    if (fbp_sysctl_flag("hw.optional.avx2_0") && fbp_sysctl_flag("hw.optional.fma"))
        return FBP_ISA_AVX2;
#elif defined(FBP_X86_DISPATCH)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
        return FBP_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return FBP_ISA_AVX2;
#endif
    return FBP_ISA_BASE;
}

/* The cap the environment variable FASTBP_ISA puts on the level: "avx512",
 * "avx2" or "baseline" (fastbp/_isa.py parses it the same way, and warns
 * about a value it does not know or a level the CPU lacks); -1 for none.
 * It lets a machine with AVX-512 run, test and time the AVX2 and baseline
 * kernels, and a user rule out a kernel bug. */
static int fbp_isa_requested(void)
{
    const char *v = getenv("FASTBP_ISA");
    if (!v)
        return -1;
    if (!strcmp(v, "avx512"))
        return FBP_ISA_AVX512;
    if (!strcmp(v, "avx2"))
        return FBP_ISA_AVX2;
    if (!strcmp(v, "baseline"))
        return FBP_ISA_BASE;
    return -1;
}

/* The level the kernels run at: the best the machine has, capped by
 * FASTBP_ISA.  Found once per compiled module, on its first call (fastbp
 * makes that call when it is imported, so the variable is read then). */
static inline int fbp_isa_best(void)
{
    static int best = -1;   /* racing first callers all store the same value */
    int isa = __atomic_load_n(&best, __ATOMIC_RELAXED);
    if (isa < 0) {
        int cap = fbp_isa_requested();
        isa = fbp_isa_detect();
        if (cap >= 0 && cap < isa)
            isa = cap;
        __atomic_store_n(&best, isa, __ATOMIC_RELAXED);
    }
    return isa;
}

#ifdef FBP_X86_DISPATCH
#define FBP_DISPATCH(fn, ty, isa, args)                               \
    ((isa) >= FBP_ISA_AVX512 ? fn##_##ty##_avx512 args :             \
     (isa) == FBP_ISA_AVX2 ? fn##_##ty##_avx2 args :                 \
     fn##_##ty##_base args)
#else
#define FBP_DISPATCH(fn, ty, isa, args) fn##_##ty##_base args
#endif

/* A level the machine has: isa itself, or the best one if isa is out of
 * range (-1 asks for the best). */
static inline int fbp_isa_clamp(int isa)
{
    return isa < 0 || isa > fbp_isa_best() ? fbp_isa_best() : isa;
}

/* The path (FBP_SG_*) the small kernels take for a product at level isa;
 * FBP_SG_NONE if they decline it. */
static inline int fbp_small_plan_f32(int isa, int trans_a, int trans_b, int m, int n, int k)
{
    return FBP_DISPATCH(small_plan, f32, fbp_isa_clamp(isa), (trans_a, trans_b, m, n, k));
}

static inline int fbp_small_plan_f64(int isa, int trans_a, int trans_b, int m, int n, int k)
{
    return FBP_DISPATCH(small_plan, f64, fbp_isa_clamp(isa), (trans_a, trans_b, m, n, k));
}

/* Row-major C[m, n] = op(A) @ op(B) (no alpha, beta: C is overwritten) on
 * a path planned at the same level, perhaps for a larger product this is a
 * range of (see small_plan). */
static inline void fbp_small_run_f32(int isa, int path, int trans_a, int m, int n, int k,
                                     const float *a, int lda, const float *b, int ldb,
                                     float *c, int ldc)
{
    FBP_DISPATCH(small_run, f32, fbp_isa_clamp(isa),
                 (path, trans_a, m, n, k, a, lda, b, ldb, c, ldc));
}

static inline void fbp_small_run_f64(int isa, int path, int trans_a, int m, int n, int k,
                                     const double *a, int lda, const double *b, int ldb,
                                     double *c, int ldc)
{
    FBP_DISPATCH(small_run, f64, fbp_isa_clamp(isa),
                 (path, trans_a, m, n, k, a, lda, b, ldb, c, ldc));
}

/* Plan and run in one call.  Returns 1 when done, 0 when the shape is not
 * one these kernels take (nothing is written). */
static inline int fbp_gemm_small_isa_f32(int isa, int trans_a, int trans_b, int m, int n,
                                         int k, const float *a, int lda, const float *b,
                                         int ldb, float *c, int ldc)
{
    int path = fbp_small_plan_f32(isa, trans_a, trans_b, m, n, k);
    if (path != FBP_SG_NONE)
        fbp_small_run_f32(isa, path, trans_a, m, n, k, a, lda, b, ldb, c, ldc);
    return path != FBP_SG_NONE;
}

static inline int fbp_gemm_small_isa_f64(int isa, int trans_a, int trans_b, int m, int n,
                                         int k, const double *a, int lda, const double *b,
                                         int ldb, double *c, int ldc)
{
    int path = fbp_small_plan_f64(isa, trans_a, trans_b, m, n, k);
    if (path != FBP_SG_NONE)
        fbp_small_run_f64(isa, path, trans_a, m, n, k, a, lda, b, ldb, c, ldc);
    return path != FBP_SG_NONE;
}

#endif  /* vector extensions */

#endif
