/* A small fork-join thread pool for the forward pass: pool_run hands out task indices
 * dynamically to the caller and the workers and returns when all are done. Workers spin briefly
 * before sleeping, because a single query runs ~100 short parallel regions and a futex wake-up per
 * region would cost more than the work. */
#ifndef EMBEDRAG_UTIL_THREADPOOL_H
#define EMBEDRAG_UTIL_THREADPOOL_H

typedef struct pool pool;

/* fn(ctx, task, thread) is called once for each task in [0, n_tasks); `thread` is in
 * [0, pool_threads()) and identifies per-thread scratch space. */
typedef void (*pool_fn)(void *ctx, int task, int thread);

/* Creates a pool of `threads` threads in all (the caller counts as one); threads <= 0 means one
 * per online core. On failure *out is NULL. */
int pool_create(int threads, pool **out);
void pool_destroy(pool *p);
int pool_threads(const pool *p);

/* Runs n_tasks tasks and waits for all. Not reentrant: one pool_run at a time per pool. */
void pool_run(pool *p, int n_tasks, pool_fn fn, void *ctx);

/* Online cores of this machine (at least 1). */
int pool_online_cores(void);

#endif
