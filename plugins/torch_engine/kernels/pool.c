/* The kernels' thread pool (see kernels.h): workers that spin on a job counter, then sleep
 * on it as a futex. */
#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "kernels.h"

#ifndef SPIN_NS
#define SPIN_NS 200000 /* a worker spins this long after a job before it sleeps */
#endif
#ifndef YIELD_NS
#define YIELD_NS 20000 /* waits longer than this yield the core between spins */
#endif
#define MAX_WORKERS 63

static struct {
    pthread_mutex_t lock; /* held by the one caller using the workers */
    int started;          /* workers running (they never exit) */
    _Atomic unsigned gen; /* bumped once per job; the futex the workers sleep on */
    _Atomic int remaining;
    part_fn fn;
    void *arg;
    int parts;
    unsigned born[MAX_WORKERS + 1]; /* gen when each worker was created: it waits for the next */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    unsigned seen = pool.born[id];
    for (;;) {
        unsigned g;
        uint64_t since = 0;
        for (int spins = 0; (g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen; ++spins) {
            if ((spins & 63) == 0) {
                const uint64_t t = now_ns();
                if (!since) since = t;
                else if (t - since > SPIN_NS) {
                    syscall(SYS_futex, &pool.gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                    since = 0;
                } else if (t - since > YIELD_NS) {
                    sched_yield(); /* a thread waiting for this core (the caller's, maybe) runs */
                }
            }
            _mm_pause();
        }
        seen = g;
        if (id < pool.parts) pool.fn(pool.arg, id, pool.parts);
        atomic_fetch_sub_explicit(&pool.remaining, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* A child forked from a process with workers has none of them (and maybe a held lock). */
static void pool_after_fork(void) {
    pool.started = 0;
    pthread_mutex_init(&pool.lock, NULL);
}

__attribute__((constructor)) static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

void run_parts(part_fn fn, void *arg, int threads) {
    if (threads <= 1 || pthread_mutex_trylock(&pool.lock) != 0) {
        fn(arg, 0, 1);
        return;
    }
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    while (pool.started < threads - 1) { /* no job is running: gen holds still */
        pthread_t th;
        pool.born[pool.started + 1] = atomic_load_explicit(&pool.gen, memory_order_relaxed);
        if (pthread_create(&th, NULL, worker, (void *)(intptr_t)(pool.started + 1)) != 0) break;
        pthread_detach(th);
        ++pool.started;
    }
    const int parts = threads < pool.started + 1 ? threads : pool.started + 1;
    pool.fn = fn;
    pool.arg = arg;
    pool.parts = parts;
    atomic_store_explicit(&pool.remaining, pool.started, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    syscall(SYS_futex, &pool.gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    fn(arg, 0, parts);
    /* Spin for the workers; past YIELD_NS, yield this core to them in case they wait for it
     * (more runnable threads than cores: a spinning caller would only delay them). */
    uint64_t since = 0;
    for (int spins = 0; atomic_load_explicit(&pool.remaining, memory_order_acquire) > 0; ++spins) {
        if ((spins & 63) == 0) {
            const uint64_t t = now_ns();
            if (!since) since = t;
            else if (t - since > YIELD_NS) sched_yield();
        }
        _mm_pause();
    }
    pthread_mutex_unlock(&pool.lock);
}
