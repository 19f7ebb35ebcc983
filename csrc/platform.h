/* What the compiler and platform offer the kernels, decided in one place.
 *
 * The vector kernels (smallgemm.h, packedgemm.h, epilogue.h, losses.h,
 * peak.h) and the worker pool (pool.h) are written with GCC/Clang vector
 * extensions and __atomic builtins, and compute offsets in `long`, which
 * must be 64 bits.  FBP_VECTORS says they are built: GCC or Clang on an
 * LP64 target (Linux and macOS, x86-64 and ARM64).  Elsewhere (MSVC, which
 * has none of these; MinGW and other LLP64 or 32-bit targets, where `long`
 * is 32 bits) every product goes to BLAS and the epilogues and losses run
 * as plain C loops, on one thread.  -DFBP_NO_VECTORS builds that portable
 * fallback anywhere, so that it can be compiled and tested on Linux
 * (tests/test_packaging.py).
 */
#ifndef FASTBP_PLATFORM_H
#define FASTBP_PLATFORM_H

#include <time.h>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__LP64__) && !defined(FBP_NO_VECTORS)
#define FBP_VECTORS 1
#endif

/* Thread-local storage, spelled as each compiler wants it. */
#if defined(_MSC_VER)
#define FBP_THREAD_LOCAL __declspec(thread)
#else
#define FBP_THREAD_LOCAL __thread
#endif

/* A hint to bring the cache line holding *p into the caches, to be read
 * soon; it never faults, whatever p is.  Nothing where the compiler has no
 * such builtin. */
#if defined(__GNUC__) || defined(__clang__)
#define fbp_prefetch(p) __builtin_prefetch((p), 0, 3)
#else
#define fbp_prefetch(p) ((void)(p))
#endif

/* Seconds on a clock for timing phases (fastbp bench --phases).  MSVC has
 * no clock_gettime; its C11 timespec_get is a wall clock, good enough for
 * timings that are only ever reported. */
static inline double fbp_now(void)
{
    struct timespec t;
#if defined(_MSC_VER)
    timespec_get(&t, TIME_UTC);
#else
    clock_gettime(CLOCK_MONOTONIC, &t);
#endif
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

#endif
