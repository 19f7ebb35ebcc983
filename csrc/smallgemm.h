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
 * Written with GCC/Clang vector extensions (32-byte vectors); on x86-64 the
 * entry points are compiled for AVX-512, AVX2+FMA and baseline SSE2 and the
 * loader picks one per machine (target_clones), so a portable wheel still
 * gets FMA where the CPU has it.  Results differ from BLAS only in rounding
 * (summation order, fused multiply-add).
 */
#ifndef FASTBP_SMALLGEMM_H
#define FASTBP_SMALLGEMM_H

#include <string.h>

/* The vector helpers are always inlined into the target clones, so the
 * ABI note GCC gives for a 32-byte vector return without AVX is moot. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

/* Above this many multiply-adds BLAS takes over: its packing is amortized
 * by then, it keeps large operands in cache, and it can use more than one
 * thread.  Measured on the project machine (AMD EPYC, AVX-512, 1 thread),
 * these kernels still matched or beat OpenBLAS at 64 x 128 x 256. */
#ifndef FBP_SMALL_MNK
#define FBP_SMALL_MNK (96L * 96L * 96L)
#endif
/* Everything is inlined into the entry points, so each target clone gets
 * its own vector code. */
#define FBP_INLINE inline __attribute__((always_inline))

/* Bytes of stack for a transposed copy of B. */
#define FBP_SMALL_TMP 16384

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FBP_NO_CLONES)
#define FBP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FBP_CLONES
#endif

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define FBP_SHUFFLE __builtin_shufflevector
#endif

#define T float
#define VL 8
#define SG(x) x##_f32
#include "smallgemm_impl.h"
#undef T
#undef VL
#undef SG

#define T double
#define VL 4
#define SG(x) x##_f64
#include "smallgemm_impl.h"
#undef T
#undef VL
#undef SG

#endif
