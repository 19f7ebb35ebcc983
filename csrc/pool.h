/* A persistent worker pool that splits one kernel call across cores.
 *
 * Why not OpenMP: after a process has used OpenMP, a forked child that uses
 * it again hangs or is killed (libgomp's worker threads do not exist in the
 * child), and joblib and multiprocessing users fork.  Why not BLAS's
 * threads: the small and packed GEMMs and the optimizer update are our own
 * code.  Why persistent and spinning: a
 * training step of a medium network is a chain of ~10 products of 10-100
 * microseconds each; starting threads, or waking sleeping ones (tens of
 * microseconds on a virtual machine), would eat the gain.
 *
 * fbp_pool_run(width, fn, ctx, n) runs fn(ctx, 0) .. fn(ctx, n - 1) on the
 * calling thread and up to width - 1 workers, and returns when all are done.
 * Tasks are claimed one at a time, so a late or busy worker only means the
 * others take more.  A worker spins for FBP_POOL_SPIN_NS after its last job
 * (so back-to-back products find it awake), then sleeps on a condition
 * variable.
 *
 * Claiming is lock-free: `ticket` packs (generation << 32 | next task).  A
 * worker reads the job of a generation from one of two slots and claims a
 * task with a compare-and-swap that fails if the generation has moved on,
 * so a stale worker can never run a task of a finished job with another
 * job's arguments (a slot is rewritten only two generations later).  The
 * caller returns once every task has finished; ctx may live on its stack.
 *
 * The pool never grows beyond the CPUs this process may run on
 * (sched_getaffinity, else the online CPUs), however wide a job asks to be:
 * n_threads=1000 on two cores starts one worker, not 63 that spin and stay.
 * Only the threads that run the tasks are capped, not the tasks: callers
 * split their work by the width they were given, and tasks are claimed
 * dynamically, so results do not depend on the cap (gemm.h's splits give
 * the same bits on any split anyway).
 *
 * One caller at a time owns the pool; a concurrent (or nested) caller runs
 * its tasks serially rather than wait.  After fork() the child starts with
 * no workers (pthread_atfork) and spawns new ones when it first needs them.
 * On Windows, and wherever the vector kernels are not built (platform.h:
 * the pool needs pthreads, __atomic builtins and a 64-bit long), everything
 * runs serially.
 */
#ifndef FASTBP_POOL_H
#define FASTBP_POOL_H

#include "platform.h"   /* FBP_VECTORS */

typedef void (*fbp_task_fn)(void *ctx, int task);

#if defined(_WIN32) || !defined(FBP_VECTORS)

static inline int fbp_pool_run(int width, fbp_task_fn fn, void *ctx, int n_tasks)
{
    (void)width;
    for (int i = 0; i < n_tasks; i++)
        fn(ctx, i);
    return 1;
}

static inline int fbp_pool_workers(void) { return 0; }

#else

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#define FBP_POOL_MAX 64
#ifndef FBP_POOL_SPIN_NS
#define FBP_POOL_SPIN_NS 200000L
#endif
/* Spinning with `pause` only for this long, then yielding the core between
 * checks: on a loaded machine (another process on one of two cores) a pure
 * spin steals the core from the thread it waits for. */
#ifndef FBP_POOL_HOT_NS
#define FBP_POOL_HOT_NS 10000L
#endif

struct fbp_job {
    fbp_task_fn fn;
    void *ctx;
    int n_tasks;
    int width;      /* workers 1 .. width - 1 take part */
    int done;       /* tasks finished */
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    int owned;                  /* a caller holds the pool */
    int n_workers;              /* workers alive in this process */
    int sleepers;               /* workers waiting on `wake` */
    uint64_t ticket;            /* generation << 32 | next task to claim */
    struct fbp_job slot[2];     /* job of generation g in slot[g & 1] */
    int atfork;                 /* the fork handler is registered */
    int cpus;                   /* CPUs this process may use (0: not yet read) */
} fbp_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static inline void fbp_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline long fbp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Claim and run tasks of generation gen until none is left (or the
 * generation has moved on). */
static void fbp_pool_work(uint32_t gen, int id)
{
    struct fbp_job *job = &fbp_pool.slot[gen & 1];
    fbp_task_fn fn = __atomic_load_n(&job->fn, __ATOMIC_RELAXED);
    void *ctx = __atomic_load_n(&job->ctx, __ATOMIC_RELAXED);
    int n = __atomic_load_n(&job->n_tasks, __ATOMIC_RELAXED);
    int width = __atomic_load_n(&job->width, __ATOMIC_RELAXED);
    if (id >= width)
        return;
    for (;;) {
        uint64_t t = __atomic_load_n(&fbp_pool.ticket, __ATOMIC_ACQUIRE);
        if ((uint32_t)(t >> 32) != gen || (int)(uint32_t)t >= n)
            return;
        /* Success proves the job read above is generation gen's. */
        if (!__atomic_compare_exchange_n(&fbp_pool.ticket, &t, t + 1, 0,
                                         __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            continue;
        fn(ctx, (int)(uint32_t)t);
        __atomic_add_fetch(&job->done, 1, __ATOMIC_RELEASE);
    }
}

/* Spin-wait step `spins` of a wait that started at `start` (ns): pause
 * while hot, then yield.  Returns the time when it looked (0 if it did
 * not). */
static inline long fbp_wait_step(int spins, long start)
{
    if (spins % 64) {
        fbp_relax();
        return 0;
    }
    long now = fbp_now_ns();
    if (now - start > FBP_POOL_HOT_NS)
        sched_yield();
    return now;
}

static void *fbp_pool_worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    uint32_t seen = (uint32_t)(__atomic_load_n(&fbp_pool.ticket, __ATOMIC_ACQUIRE) >> 32);
    for (;;) {
        long start = fbp_now_ns(), now;
        uint32_t gen;
        int spins = 0;
        while ((gen = (uint32_t)(__atomic_load_n(&fbp_pool.ticket, __ATOMIC_ACQUIRE) >> 32))
               == seen) {
            now = fbp_wait_step(++spins, start);
            if (now == 0 || now - start < FBP_POOL_SPIN_NS)
                continue;
            /* Sleep.  sleepers is raised before the generation is read
             * again and the caller publishes before it reads sleepers (both
             * sequentially consistent), so one of the two sees the other. */
            pthread_mutex_lock(&fbp_pool.mu);
            __atomic_add_fetch(&fbp_pool.sleepers, 1, __ATOMIC_SEQ_CST);
            while ((uint32_t)(__atomic_load_n(&fbp_pool.ticket, __ATOMIC_SEQ_CST) >> 32)
                   == seen)
                pthread_cond_wait(&fbp_pool.wake, &fbp_pool.mu);
            __atomic_sub_fetch(&fbp_pool.sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&fbp_pool.mu);
            start = fbp_now_ns();
        }
        seen = gen;
        fbp_pool_work(gen, id);
    }
    return NULL;
}

/* In a forked child only the forking thread exists: forget the workers and
 * any owner (the caller that owned the pool is not running in the child). */
static void fbp_pool_after_fork_child(void)
{
    pthread_mutex_init(&fbp_pool.mu, NULL);
    pthread_cond_init(&fbp_pool.wake, NULL);
    fbp_pool.n_workers = 0;
    fbp_pool.sleepers = 0;
    fbp_pool.owned = 0;
}

/* CPUs this process may run on: its affinity mask where there is one
 * (taskset, cgroup cpusets, a batch scheduler's allocation), else the
 * online CPUs; at least 1.  Read once, by the pool's owner. */
static int fbp_pool_cpus(void)
{
    if (fbp_pool.cpus > 0)
        return fbp_pool.cpus;
    long n = 0;
#if defined(__linux__) && defined(CPU_COUNT)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        n = CPU_COUNT(&set);
#endif
#ifdef _SC_NPROCESSORS_ONLN
    if (n < 1)
        n = sysconf(_SC_NPROCESSORS_ONLN);
#endif
    fbp_pool.cpus = n < 1 ? 1 : n > FBP_POOL_MAX ? FBP_POOL_MAX : (int)n;
    return fbp_pool.cpus;
}

/* Start workers until there are want - 1 (the caller is the first thread),
 * at most one fewer than the CPUs. */
static void fbp_pool_grow(int want)
{
    if (!fbp_pool.atfork) {
        pthread_atfork(NULL, NULL, fbp_pool_after_fork_child);
        fbp_pool.atfork = 1;
    }
    if (want > fbp_pool_cpus())
        want = fbp_pool_cpus();
    while (fbp_pool.n_workers < want - 1 && fbp_pool.n_workers < FBP_POOL_MAX - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, fbp_pool_worker,
                                (void *)(intptr_t)(fbp_pool.n_workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0)
            break;
        fbp_pool.n_workers++;
    }
}

/* Workers started in this process (for tests). */
static inline int fbp_pool_workers(void)
{
    return __atomic_load_n(&fbp_pool.n_workers, __ATOMIC_ACQUIRE);
}

/* Run fn(ctx, i) for i < n_tasks on up to `width` threads (the caller
 * included).  Returns the number of threads that could take part (1 when
 * the pool was busy and the tasks ran on the caller alone). */
static int fbp_pool_run(int width, fbp_task_fn fn, void *ctx, int n_tasks)
{
    int expected = 0;
    if (width > FBP_POOL_MAX)
        width = FBP_POOL_MAX;
    if (width < 2 || n_tasks < 2
        || !__atomic_compare_exchange_n(&fbp_pool.owned, &expected, 1, 0,
                                        __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        for (int i = 0; i < n_tasks; i++)
            fn(ctx, i);
        return 1;
    }
    fbp_pool_grow(width);
    if (width > fbp_pool.n_workers + 1)
        width = fbp_pool.n_workers + 1;
    if (width < 2) {    /* one CPU, or no worker could be started */
        for (int i = 0; i < n_tasks; i++)
            fn(ctx, i);
        __atomic_store_n(&fbp_pool.owned, 0, __ATOMIC_RELEASE);
        return 1;
    }
    uint64_t t = __atomic_load_n(&fbp_pool.ticket, __ATOMIC_RELAXED);
    uint32_t gen = (uint32_t)(t >> 32) + 1;
    struct fbp_job *job = &fbp_pool.slot[gen & 1];
    __atomic_store_n(&job->fn, fn, __ATOMIC_RELAXED);
    __atomic_store_n(&job->ctx, ctx, __ATOMIC_RELAXED);
    __atomic_store_n(&job->n_tasks, n_tasks, __ATOMIC_RELAXED);
    __atomic_store_n(&job->width, width, __ATOMIC_RELAXED);
    __atomic_store_n(&job->done, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&fbp_pool.ticket, (uint64_t)gen << 32, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&fbp_pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&fbp_pool.mu);
        pthread_cond_broadcast(&fbp_pool.wake);
        pthread_mutex_unlock(&fbp_pool.mu);
    }
    fbp_pool_work(gen, 0);
    long start = fbp_now_ns();
    for (int spins = 1; __atomic_load_n(&job->done, __ATOMIC_ACQUIRE) < n_tasks; spins++)
        fbp_wait_step(spins, start);
    __atomic_store_n(&fbp_pool.owned, 0, __ATOMIC_RELEASE);
    return width;
}

#endif  /* pthreads */

#endif
