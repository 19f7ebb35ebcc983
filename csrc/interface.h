/* Compile-time agreement between a C header's codes and fastbp/_ext/engine.pxd.
 *
 * The .pxd is the one declaration of the engine's interface (program
 * columns, layer kinds, activation, loss and status codes), but a C header
 * cannot read it: epilogue.h and losses.h keep #defines of the codes they
 * branch on.  The .pyx that includes such a header states, at module level,
 * FBP_SAME(the header's name, the .pxd's name) for each of them; Cython
 * emits the names as they are (a #define and an enum constant), so a
 * mismatch stops the C compiler.  Nothing runs.
 */
#ifndef FASTBP_INTERFACE_H
#define FASTBP_INTERFACE_H

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define FBP_SAME(c_value, pxd_value)                                          \
    do {                                                                      \
        _Static_assert((c_value) == (pxd_value),                              \
                       #c_value " in a C header differs from "                \
                       "fastbp/_ext/engine.pxd (" #pxd_value ")");            \
    } while (0)
#else
/* A compiler without C11 (MSVC unless given /std:c11): an array of
 * negative size is an error in any C, with a vaguer message. */
#define FBP_SAME(c_value, pxd_value)                                          \
    do {                                                                      \
        typedef char fbp_c_header_differs_from_engine_pxd                     \
            [((c_value) == (pxd_value)) ? 1 : -1];                            \
        (void)sizeof(fbp_c_header_differs_from_engine_pxd);                   \
    } while (0)
#endif

#endif
