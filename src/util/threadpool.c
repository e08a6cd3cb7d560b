/* Fork-join pool (see threadpool.h). Each threadpool_run bumps a generation counter that workers
 * watch; tasks are claimed with an atomic counter so uneven tasks balance themselves, and since
 * every task computes its outputs the same way whoever runs it, results never depend on scheduling.
 */
#include "util/threadpool.h"

#include "util/error.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

/* How long an idle worker spins before sleeping on the condition variable: a pause instruction
 * takes ~40-140 cycles, so this is roughly 50-150 microseconds, enough to bridge the gaps between
 * a query's parallel regions, short enough that an idle engine or an oversubscribed machine (a
 * worker spinning on a core another process needs) does not lose much. */
#define THREADPOOL_SPIN_ITERATIONS 4000
/* The caller waiting for workers spins this long, then yields its core at each check, in case a
 * worker it waits for is not running (more runnable threads than cores). */
#define THREADPOOL_WAIT_SPIN_ITERATIONS 4000

struct threadpool {
    int threads;
    pthread_t *workers;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    atomic_uint generation;
    atomic_int next_task;
    atomic_int pending; /* workers that have not finished the current generation */
    int n_tasks;
    threadpool_fn fn;
    void *ctx;
    atomic_bool stop;
};

typedef struct worker_arg {
    threadpool *p;
    int index;
} worker_arg;

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void run_tasks(threadpool *p, int thread)
{
    for (;;) {
        int task = atomic_fetch_add_explicit(&p->next_task, 1, memory_order_relaxed);
        if (task >= p->n_tasks) break;
        p->fn(p->ctx, task, thread);
    }
}

static void *worker_main(void *arg)
{
    worker_arg *wa = arg;
    threadpool *p = wa->p;
    int index = wa->index;
    free(wa);
    unsigned seen = 0;
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen &&
               !atomic_load(&p->stop)) {
            if (++spins < THREADPOOL_SPIN_ITERATIONS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&p->lock);
            while (atomic_load(&p->generation) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->wake, &p->lock);
            pthread_mutex_unlock(&p->lock);
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = gen;
        run_tasks(p, index);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_acq_rel);
    }
}

int threadpool_online_cores(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int threadpool_create(int threads, threadpool **out)
{
    *out = NULL;
    if (threads <= 0) threads = threadpool_online_cores();
    threadpool *p = calloc(1, sizeof *p);
    if (!p) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating the thread pool");
    p->threads = threads;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    p->workers = calloc((size_t)threads, sizeof *p->workers);
    if (!p->workers) goto free_pool;
    for (int i = 1; i < threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) goto stop_workers;
        wa->p = p;
        wa->index = i;
        if (pthread_create(&p->workers[i], NULL, worker_main, wa) != 0) {
            free(wa);
            p->threads = i; /* only i-1 workers exist; join those */
            goto stop_workers;
        }
    }
    *out = p;
    return 0;
stop_workers:
    threadpool_destroy(p);
    return err_set(EMBEDRAG_ERR_NO_MEMORY, "could not start %d worker threads", threads - 1);
free_pool:
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->wake);
    free(p);
    return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating the thread pool");
}

void threadpool_destroy(threadpool *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->lock);
    atomic_store(&p->stop, true);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int i = 1; i < p->threads; i++) pthread_join(p->workers[i], NULL);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->wake);
    free(p->workers);
    free(p);
}

int threadpool_threads(const threadpool *p)
{
    return p->threads;
}

void threadpool_run(threadpool *p, int n_tasks, threadpool_fn fn, void *ctx)
{
    if (n_tasks <= 0) return;
    if (p->threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next_task, 0, memory_order_relaxed);
    atomic_store_explicit(&p->pending, p->threads - 1, memory_order_relaxed);
    pthread_mutex_lock(&p->lock);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    run_tasks(p, 0);
    for (int spins = 0; atomic_load_explicit(&p->pending, memory_order_acquire) > 0; spins++) {
        if (spins < THREADPOOL_WAIT_SPIN_ITERATIONS)
            cpu_relax();
        else
            sched_yield();
    }
}
