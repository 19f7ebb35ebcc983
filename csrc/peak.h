/* The multiply-add peak of one core, measured: the physical limit that
 * `fastbp bench` reports GEMM throughput against.
 *
 * Why measured rather than computed from a datasheet: the clock of a cloud
 * core is not known (turbo, the host's share), and whether a 64-byte
 * multiply-add costs one or two issue slots differs between CPUs (AMD Zen 4
 * splits it in two 32-byte halves; Intel's server cores with two 512-bit
 * units do not).  A loop of independent multiply-add chains at one
 * instruction-set level, long enough to reach full clock, gives the number
 * a kernel at that level could reach on this core now.
 *
 * FBP_PEAK_CHAINS independent accumulators hide the multiply-add latency
 * (4-5 cycles) on two pipes with slack; they stay in registers at every
 * level (12 of AVX2's 16 vector registers).  Each is updated as
 * v = v * one + step, so values stay finite and normal for any length.
 */
#ifndef FASTBP_PEAK_H
#define FASTBP_PEAK_H

#include <stdint.h>

#include "smallgemm.h"   /* FBP_ISA_*, FBP_X86_DISPATCH, FBP_CAT */

#define FBP_PEAK_CHAINS 12

#ifndef FBP_VECTORS
/* Without vector extensions (platform.h): the same chains over arrays of a
 * 32-byte vector's lanes in plain C, which the compiler vectorizes as it
 * can; the baseline level's arithmetic, and the limit of this build's own
 * loops (its products go to BLAS). */
#define PK_PLAIN(T, NAME)                                                       \
    static double NAME(int64_t iters)                                           \
    {                                                                           \
        volatile T one_v = 1, step_v = (T)1e-7;                                 \
        T one = one_v, step = step_v, s[FBP_PEAK_CHAINS][32 / sizeof(T)];       \
        for (int i = 0; i < FBP_PEAK_CHAINS; i++)                               \
            for (int j = 0; j < (int)(32 / sizeof(T)); j++)                     \
                s[i][j] = step * (T)i;                                          \
        for (int64_t n = 0; n < iters; n++)                                     \
            for (int i = 0; i < FBP_PEAK_CHAINS; i++)                           \
                for (int j = 0; j < (int)(32 / sizeof(T)); j++)                 \
                    s[i][j] = s[i][j] * one + step;                             \
        T total = 0;                                                            \
        for (int i = 0; i < FBP_PEAK_CHAINS; i++)                               \
            for (int j = 0; j < (int)(32 / sizeof(T)); j++)                     \
                total += s[i][j];                                               \
        return (double)total;                                                   \
    }
PK_PLAIN(float, fbp_peak_f32_plain)
PK_PLAIN(double, fbp_peak_f64_plain)
#undef PK_PLAIN

static double fbp_fma_probe(int isa, int dbl, int64_t iters)
{
    volatile double sink = dbl ? fbp_peak_f64_plain(iters) : fbp_peak_f32_plain(iters);
    (void)isa;
    (void)sink;
    return 2.0 * FBP_PEAK_CHAINS * (32 / (dbl ? 8 : 4)) * (double)iters;
}
#else

#define PK_BODY(T, BYTES, NAME, ATTR)                                           \
    static ATTR __attribute__((noinline)) double NAME(int64_t iters)             \
    {                                                                           \
        typedef T vec __attribute__((vector_size(BYTES)));                      \
        /* volatile: the compiler cannot know one is 1 and fold it away */   \
        volatile T one_v = 1, step_v = (T)1e-7;                                 \
        vec s[FBP_PEAK_CHAINS], one, step;                                      \
        for (int j = 0; j < (int)(BYTES / sizeof(T)); j++) {                    \
            one[j] = one_v;                                                     \
            step[j] = step_v;                                                   \
        }                                                                       \
        for (int i = 0; i < FBP_PEAK_CHAINS; i++)                               \
            s[i] = step * (T)i;                                                 \
        for (int64_t n = 0; n < iters; n++) {                                   \
            for (int i = 0; i < FBP_PEAK_CHAINS; i++)                           \
                s[i] = s[i] * one + step;                                       \
        }                                                                       \
        T total = 0;                                                            \
        for (int i = 0; i < FBP_PEAK_CHAINS; i++)                               \
            for (int j = 0; j < (int)(BYTES / sizeof(T)); j++)                  \
                total += s[i][j];                                               \
        return (double)total;                                                   \
    }

PK_BODY(float, FBP_BASE_BYTES, fbp_peak_f32_base, )
PK_BODY(double, FBP_BASE_BYTES, fbp_peak_f64_base, )
#ifdef FBP_X86_DISPATCH
PK_BODY(float, 32, fbp_peak_f32_avx2, __attribute__((target("avx2,fma"))))
PK_BODY(double, 32, fbp_peak_f64_avx2, __attribute__((target("avx2,fma"))))
PK_BODY(float, 64, fbp_peak_f32_avx512, __attribute__((target("avx512f,avx2,fma"))))
PK_BODY(double, 64, fbp_peak_f64_avx512, __attribute__((target("avx512f,avx2,fma"))))
#endif
#undef PK_BODY

/* Runs `iters` rounds of FBP_PEAK_CHAINS vector multiply-adds at level isa
 * (clamped to the machine's) and returns the flops done (2 a lane); the
 * caller times it.  At the baseline level on x86-64 there is no FMA
 * instruction: the probe then measures separate multiplies and adds, the
 * kernels' limit at that level too. */
static double fbp_fma_probe(int isa, int dbl, int64_t iters)
{
    isa = fbp_isa_clamp(isa);
    int bytes = FBP_BASE_BYTES;
    volatile double sink;
#ifdef FBP_X86_DISPATCH
    if (isa >= FBP_ISA_AVX512) {
        bytes = 64;
        sink = dbl ? fbp_peak_f64_avx512(iters) : fbp_peak_f32_avx512(iters);
    } else if (isa == FBP_ISA_AVX2) {
        bytes = 32;
        sink = dbl ? fbp_peak_f64_avx2(iters) : fbp_peak_f32_avx2(iters);
    } else
#endif
        sink = dbl ? fbp_peak_f64_base(iters) : fbp_peak_f32_base(iters);
    (void)sink;
    return 2.0 * FBP_PEAK_CHAINS * (bytes / (dbl ? 8 : 4)) * (double)iters;
}

#endif  /* vector extensions */
#endif
