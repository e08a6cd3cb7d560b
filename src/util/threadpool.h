/* A small fork-join thread pool for the forward pass: threadpool_run hands out task indices
 * dynamically to the caller and the workers and returns when all are done. Workers spin briefly
 * before sleeping, because a single query runs ~100 short parallel regions and a futex wake-up per
 * region would cost more than the work. */
#ifndef EMBEDRAG_UTIL_THREADPOOL_H
#define EMBEDRAG_UTIL_THREADPOOL_H

typedef struct threadpool threadpool;

/* fn(ctx, task, thread) is called once for each task in [0, n_tasks); `thread` is in
 * [0, threadpool_threads()) and identifies per-thread scratch space. */
typedef void (*threadpool_fn)(void *ctx, int task, int thread);

/* Creates a pool of `threads` threads in all (the caller counts as one); threads <= 0 means one
 * per online core. On failure *out is NULL. */
int threadpool_create(int threads, threadpool **out);
void threadpool_destroy(threadpool *p);
int threadpool_threads(const threadpool *p);

/* Runs n_tasks tasks and waits for all. Not reentrant: one threadpool_run at a time per pool. */
void threadpool_run(threadpool *p, int n_tasks, threadpool_fn fn, void *ctx);

/* Bulk work and the scheduler. threadpool_bulk_enter marks the calling thread as doing bulk work
 * until threadpool_bulk_leave(saved): on Linux it becomes SCHED_BATCH with a long time slice (on
 * kernels whose EEVDF scheduler takes custom slices, 6.12 and later). It keeps its share of the
 * CPU, but it no longer preempts a running thread when it wakes, and a query's thread that wakes
 * takes the core from it at once instead of after its slice. Workers follow the thread that runs
 * the pool: they run a bulk caller's tasks as bulk work, and any other caller's as before. No
 * privilege is needed either way; where the calls fail, nothing changes.
 *
 * Why (measured, Linux 6.18 on 2 cores): a query's pass that released the pool woke the waiting
 * bulk pass, which took the query thread's core for a whole slice (3.5-4 ms in one query of
 * ten); and a query that arrived while both cores ran bulk work waited up to a slice to start. */
typedef struct threadpool_sched {
    int policy;
    unsigned long long slice_ns;
    int changed; /* whether enter changed anything (leave restores only then) */
} threadpool_sched;

void threadpool_bulk_enter(threadpool_sched *saved);
/* Restores what enter saved, once: it clears saved->changed, so a second leave does nothing. */
void threadpool_bulk_leave(threadpool_sched *saved);

/* Online cores of this machine (at least 1). */
int threadpool_online_cores(void);

#endif
