/* Fork-join pool (see threadpool.h). Each threadpool_run bumps a generation counter that workers
 * watch; tasks are claimed from a word tagged with the generation, so uneven tasks balance
 * themselves and a late worker cannot take a later run's task; a run ends when its tasks are done,
 * whether or not every worker showed up. Every task computes its outputs the same way whoever
 * runs it, so results never depend on scheduling. */
#include "util/threadpool.h"

#include "util/error.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
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
    /* The current generation in the high 32 bits, the next unclaimed task in the low ones: a
     * worker claims a task with one compare-and-swap that fails once the generation has moved
     * on, so a worker that wakes late can never take a task of a later run. */
    atomic_uint_fast64_t claim;
    atomic_int done;       /* tasks of the current generation finished */
    atomic_bool bulk;      /* whether the current generation's caller is in bulk mode */
    atomic_int caller_cpu; /* the core the current generation's caller started on, or -1 */
    atomic_int n_tasks;    /* read by late workers while the next run is being set up */
    threadpool_fn fn;
    void *ctx;
    atomic_bool stop;
};

typedef struct worker_arg {
    threadpool *p;
    int index;
    bool creator_bulk; /* created by a thread in bulk mode, whose policy it inherited */
} worker_arg;

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claims and runs tasks of generation `gen` until none is left (or the generation is over). */
static void run_tasks(threadpool *p, unsigned gen, int thread)
{
    uint_fast64_t c = atomic_load_explicit(&p->claim, memory_order_acquire);
    for (;;) {
        if ((unsigned)(c >> 32) != gen) return;
        int64_t task = (int64_t)(c & 0xFFFFFFFFu);
        if (task >= atomic_load_explicit(&p->n_tasks, memory_order_relaxed)) return;
        /* On success the generation cannot end before this task is done, so fn, ctx and n_tasks
         * stay this generation's; on failure c holds the current word and the loop re-checks. */
        if (!atomic_compare_exchange_weak_explicit(&p->claim, &c, c + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        p->fn(p->ctx, (int)task, thread);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
        c = atomic_load_explicit(&p->claim, memory_order_acquire);
    }
}

/* ---- bulk work and the scheduler (see threadpool_bulk_enter) ---- */

/* The slice a bulk thread asks for: long against the default (0.75-3 ms), within the kernel's
 * range for custom slices (0.1-100 ms). */
#define THREADPOOL_BULK_SLICE_NS 20000000ull

/* Whether the calling thread is in bulk mode (its callers' tasks run as bulk work). */
static _Thread_local bool thread_bulk;

#if defined(__linux__) && defined(SYS_sched_setattr) && defined(SYS_sched_getattr)
/* The kernel's struct sched_attr (first version, 48 bytes; glibc 2.36 has no wrapper). */
typedef struct sched_attr_v1 {
    uint32_t size, policy;
    uint64_t flags;
    int32_t nice;
    uint32_t priority;
    uint64_t runtime, deadline, period;
} sched_attr_v1;

static bool sched_get(sched_attr_v1 *a)
{
    memset(a, 0, sizeof *a);
    return syscall(SYS_sched_getattr, 0, a, (unsigned)sizeof *a, 0u) == 0;
}

/* Sets the policy and slice, keeping the nice value; without custom slices (kernels before
 * 6.12 ignore or refuse the runtime), the policy alone. */
static bool sched_set(const sched_attr_v1 *base, int policy, uint64_t slice_ns)
{
    sched_attr_v1 a = *base;
    a.size = (uint32_t)sizeof a;
    a.policy = (uint32_t)policy;
    a.flags = 0;
    a.priority = 0;
    a.runtime = slice_ns;
    a.deadline = a.period = 0;
    if (syscall(SYS_sched_setattr, 0, &a, 0u) == 0) return true;
    a.runtime = 0;
    return syscall(SYS_sched_setattr, 0, &a, 0u) == 0;
}
#endif

void threadpool_bulk_enter(threadpool_sched *saved)
{
    memset(saved, 0, sizeof *saved);
#if defined(__linux__) && defined(SYS_sched_setattr) && defined(SYS_sched_getattr)
    sched_attr_v1 a;
    /* Real-time and idle threads, and threads already in bulk mode, stay as they are. */
    if (thread_bulk || !sched_get(&a) || a.policy != SCHED_OTHER) return;
    if (!sched_set(&a, SCHED_BATCH, THREADPOOL_BULK_SLICE_NS)) return;
    saved->policy = (int)a.policy;
    saved->slice_ns = a.runtime;
    saved->changed = 1;
    thread_bulk = true;
#endif
}

void threadpool_bulk_leave(threadpool_sched *saved)
{
    if (!saved->changed) return;
    saved->changed = 0;
#if defined(__linux__) && defined(SYS_sched_setattr) && defined(SYS_sched_getattr)
    sched_attr_v1 a;
    if (!sched_get(&a)) return;
    sched_set(&a, saved->policy, saved->slice_ns);
    thread_bulk = false;
#endif
}

/* Back to the normal policy and the default slice (for a worker started by a bulk thread: bulk
 * mode is only ever entered from SCHED_OTHER). */
static void worker_normal(void)
{
#if defined(__linux__) && defined(SYS_sched_setattr) && defined(SYS_sched_getattr)
    sched_attr_v1 a;
    if (sched_get(&a)) sched_set(&a, SCHED_OTHER, 0);
#endif
}

/* A worker that finds itself on the caller's core while the run starts moves off it: a wake-up
 * placed it there because the other core was still busy for a few microseconds more (the pass
 * that just gave the pool up), and the scheduler does not pull a waiting thread onto a core that
 * has just gone idle until its next periodic balance, milliseconds later. Meanwhile the caller
 * ran every task alone and the two took turns on one core (measured through the server: a
 * 16-token query's pass took 4-6 ms instead of 1.9, one query in three under bulk load).
 * Narrowing the worker's CPU mask moves it at once; the old mask is restored straight after. */
static void worker_leave_core(int caller_cpu)
{
#if defined(__linux__) && defined(CPU_SET)
    if (caller_cpu < 0 || sched_getcpu() != caller_cpu) return;
    cpu_set_t allowed, others;
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return;
    others = allowed;
    CPU_CLR(caller_cpu, &others);
    if (CPU_COUNT(&others) == 0) return;
    if (sched_setaffinity(0, sizeof others, &others) == 0)
        sched_setaffinity(0, sizeof allowed, &allowed);
#else
    (void)caller_cpu;
#endif
}

/* A worker takes the mode of the caller whose tasks it runs. */
static void worker_follow(bool bulk, threadpool_sched *saved)
{
    if (bulk == thread_bulk) return;
    if (bulk)
        threadpool_bulk_enter(saved);
    else
        threadpool_bulk_leave(saved);
}

static void *worker_main(void *arg)
{
    worker_arg *wa = arg;
    threadpool *p = wa->p;
    int index = wa->index;
    bool creator_bulk = wa->creator_bulk;
    free(wa);
    /* A new thread inherits its creator's policy: a pool created from a bulk thread would
     * start as SCHED_BATCH without being in bulk mode, and never follow a normal caller. */
    if (creator_bulk) worker_normal();
    unsigned seen = 0;
    threadpool_sched sched_saved = {0};
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen &&
               !atomic_load(&p->stop)) {
            if (++spins < THREADPOOL_SPIN_ITERATIONS) {
                cpu_relax();
                continue;
            }
            /* Sleep as a normal thread: a query's run may be what wakes this worker, and a bulk
             * (SCHED_BATCH) thread woken onto a busy core stays off it even when the other core
             * has just gone idle (seen: a query's pass ran alone for 4 ms beside an idle core). */
            worker_follow(false, &sched_saved);
            pthread_mutex_lock(&p->lock);
            while (atomic_load(&p->generation) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->wake, &p->lock);
            pthread_mutex_unlock(&p->lock);
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = gen;
        worker_follow(atomic_load_explicit(&p->bulk, memory_order_relaxed), &sched_saved);
        worker_leave_core(atomic_load_explicit(&p->caller_cpu, memory_order_relaxed));
        run_tasks(p, gen, index);
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
        wa->creator_bulk = thread_bulk;
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
    /* Close the claim word to the previous run first (a new generation with no task open), so
     * that a worker still inside it cannot claim anything while fn, ctx and n_tasks change. */
    unsigned gen = atomic_load_explicit(&p->generation, memory_order_relaxed) + 1;
    atomic_store_explicit(&p->claim, (uint_fast64_t)gen << 32 | 0xFFFFFFFFu, memory_order_seq_cst);
    p->fn = fn;
    p->ctx = ctx;
    atomic_store_explicit(&p->n_tasks, n_tasks, memory_order_relaxed);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_store_explicit(&p->bulk, thread_bulk, memory_order_relaxed);
#ifdef __linux__
    atomic_store_explicit(&p->caller_cpu, sched_getcpu(), memory_order_relaxed);
#else
    atomic_store_explicit(&p->caller_cpu, -1, memory_order_relaxed);
#endif
    atomic_store_explicit(&p->claim, (uint_fast64_t)gen << 32, memory_order_release);
    pthread_mutex_lock(&p->lock);
    atomic_store_explicit(&p->generation, gen, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    /* The caller runs tasks too, and waits only for tasks a worker has claimed: a worker that is
     * not running (it shares a core with the caller or another process) never holds up a run,
     * the caller takes its share. */
    run_tasks(p, gen, 0);
    for (int spins = 0; atomic_load_explicit(&p->done, memory_order_acquire) < n_tasks; spins++) {
        if (spins < THREADPOOL_WAIT_SPIN_ITERATIONS)
            cpu_relax();
        else
            sched_yield();
    }
}
