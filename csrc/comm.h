/* comm.h: the one collective the training step needs, a sum over MPI ranks.
 *
 * Why a function pointer and not mpi.h: fastbp is built (and its wheels are
 * built) without any MPI installed; the MPI library is the one mpi4py
 * loaded in the user's process (a cluster's own MPI, or the mpich wheel).
 * fastbp.distributed finds MPI_Allreduce in that library (ctypes with
 * RTLD_NOLOAD) and takes every handle from mpi4py (comm.handle,
 * MPI.FLOAT.handle, MPI.DOUBLE.handle, MPI.SUM.handle, MPI.IN_PLACE,
 * MPI.SUCCESS): no MPI constant is written here.
 *
 * Handles are ints in the MPICH family (MPICH, Intel MPI, MVAPICH) and
 * pointers in Open MPI and the MPI-5 standard ABI; a call through the wrong
 * prototype would pass the wrong register width, so the prototype is chosen
 * at run time from ``ptr_handles`` (mpi4py's MPI._sizeof(MPI.Comm)).
 */
#ifndef FBP_COMM_H
#define FBP_COMM_H

#include <limits.h>
#include <stdint.h>
#include <string.h>

typedef struct fbp_comm {
    void *allreduce;          /* MPI_Allreduce in the loaded MPI library */
    int ptr_handles;          /* 1: pointer handles; 0: int handles */
    intptr_t comm, op_sum, type_float, type_double;
    intptr_t in_place;        /* MPI_IN_PLACE's value */
    int success;              /* MPI_SUCCESS's value */
    int error;                /* the first failing call's return code (0: none) */
} fbp_comm;

typedef int (*fbp_allreduce_int_t)(const void *, void *, int, int, int, int);
typedef int (*fbp_allreduce_ptr_t)(const void *, void *, int, void *, void *, void *);

/* MPI_Allreduce(sendbuf, recvbuf, count, datatype, op, comm), with the
 * handles' C type of the library's family. */
/* buf[0:count] = its sum over the ranks, in place (count in elements of
 * float32 or float64).  Returns 0, or the MPI error code (also kept in
 * c->error).  MPI counts are int: larger vectors go in pieces. */
static int fbp_allreduce_sum(fbp_comm *c, void *buf, int64_t count, int is_double)
{
    const size_t elem = is_double ? sizeof(double) : sizeof(float);
    const intptr_t type = is_double ? c->type_double : c->type_float;
    char *p = (char *)buf;
    while (count > 0) {
        int n = count > INT_MAX ? INT_MAX : (int)count;
        int rc;
        if (c->ptr_handles)
            rc = ((fbp_allreduce_ptr_t)c->allreduce)((const void *)c->in_place, p, n,
                                                    (void *)type, (void *)c->op_sum,
                                                    (void *)c->comm);
        else
            rc = ((fbp_allreduce_int_t)c->allreduce)((const void *)c->in_place, p, n,
                                                    (int)type, (int)c->op_sum, (int)c->comm);
        if (rc != c->success) {
            if (!c->error)
                c->error = rc ? rc : -1;
            return c->error;
        }
        p += (size_t)n * elem;
        count -= n;
    }
    return 0;
}

#endif
