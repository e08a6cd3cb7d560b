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

/* Online cores of this machine (at least 1). */
int threadpool_online_cores(void);

#endif
