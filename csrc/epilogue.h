/* Elementwise passes of a dense layer, vectorized: bias + cheap activation
 * (identity, ReLU, leaky ReLU) after the forward GEMM, and in the backward
 * pass that activation's derivative fused with the bias gradient's column
 * sums.
 *
 * Why: compiled by Cython without -march these loops run two doubles per
 * instruction; on digits (batch 200, 100 hidden units) they were about
 * 12 us of a 127 us training step.  Like smallgemm.h they are written with
 * GCC/Clang vector extensions and compiled once per instruction-set level
 * (fbp_isa_best picks it at run time), so a portable wheel gets AVX-512
 * where the CPU has it.  Backward is one pass: g is rewritten and added to
 * db while it is in registers.
 *
 * Results are bitwise those of the scalar loops in dense.pyx: the
 * activations are exact (a select, or one product for leaky ReLU), and each
 * db[j] is still summed row by row from 0 (only columns run in parallel).
 * NaN behaves as there too (ReLU of NaN is 0, its derivative 0).
 *
 * Entry points return 1 when done, 0 for an activation they do not take
 * (dense.pyx then runs its scalar loop).  The backward entry point always
 * takes identity (plain column sums), which dense.pyx uses after its own
 * loop for the other activations.  Without vector extensions (MSVC) that is
 * all they take, in scalar loops.
 */
#ifndef FASTBP_EPILOGUE_H
#define FASTBP_EPILOGUE_H

#include <stdint.h>
#include <string.h>

#include "smallgemm.h"   /* fbp_isa_best, fbp_isa_clamp, FBP_DISPATCH, FBP_CAT */

/* Activation codes: Act in fastbp/_ext/engine.pxd (dense.pyx checks at
 * compile time that these agree with it). */
#define FBP_ACT_IDENTITY 0
#define FBP_ACT_RELU 3
#define FBP_ACT_LEAKY_RELU 4

#ifndef FBP_VECTORS
static inline int fbp_bias_act_f32(int isa, float *z, const float *b, int64_t m, int64_t n,
                                   int act, float slope) { return 0; }
static inline int fbp_bias_act_f64(int isa, double *z, const double *b, int64_t m, int64_t n,
                                   int act, double slope) { return 0; }
/* Only the column sums (identity), which dense.pyx relies on. */
#define FBP_EP_COLUMN_SUMS(T)                                               \
    if (act != FBP_ACT_IDENTITY)                                            \
        return 0;                                                           \
    memset(db, 0, (size_t)n * sizeof(T));                                   \
    for (int64_t i = 0; i < m; i++)                                         \
        for (int64_t j = 0; j < n; j++)                                     \
            db[j] += g[i * n + j];                                          \
    return 1;
static inline int fbp_act_backward_db_f32(int isa, float *g, const float *a, float *db,
                                          int64_t m, int64_t n, int act, float slope)
{ FBP_EP_COLUMN_SUMS(float) }
static inline int fbp_act_backward_db_f64(int isa, double *g, const double *a, double *db,
                                          int64_t m, int64_t n, int act, double slope)
{ FBP_EP_COLUMN_SUMS(double) }
#else

#define EP_ATTR
#define EP_BYTES FBP_BASE_BYTES
#define EP_ISA base
#include "epilogue_pair.h"

#ifdef FBP_X86_DISPATCH
#define EP_ATTR __attribute__((target("avx2,fma")))
#define EP_BYTES 32
#define EP_ISA avx2
#include "epilogue_pair.h"

#define EP_ATTR __attribute__((target("avx512f,avx2,fma")))
#define EP_BYTES 64
#define EP_ISA avx512
#include "epilogue_pair.h"
#endif

/* z[i, j] = act(z[i, j] + b[j]) in place, z (m, n) row-major; isa -1: the
 * best level.  slope: leaky ReLU's negative slope. */
static inline int fbp_bias_act_f32(int isa, float *z, const float *b, int64_t m, int64_t n,
                                   int act, float slope)
{ return FBP_DISPATCH(ep_bias_act, f32, fbp_isa_clamp(isa), (z, b, m, n, act, slope)); }
static inline int fbp_bias_act_f64(int isa, double *z, const double *b, int64_t m, int64_t n,
                                   int act, double slope)
{ return FBP_DISPATCH(ep_bias_act, f64, fbp_isa_clamp(isa), (z, b, m, n, act, slope)); }

/* g *= act'(x) in place (in terms of the output a = act(x); identity
 * leaves g alone), then db[j] = sum over rows of g[:, j]. */
static inline int fbp_act_backward_db_f32(int isa, float *g, const float *a, float *db,
                                          int64_t m, int64_t n, int act, float slope)
{ return FBP_DISPATCH(ep_backward_db, f32, fbp_isa_clamp(isa), (g, a, db, m, n, act, slope)); }
static inline int fbp_act_backward_db_f64(int isa, double *g, const double *a, double *db,
                                          int64_t m, int64_t n, int act, double slope)
{ return FBP_DISPATCH(ep_backward_db, f64, fbp_isa_clamp(isa), (g, a, db, m, n, act, slope)); }

#endif  /* vector extensions */
#endif
