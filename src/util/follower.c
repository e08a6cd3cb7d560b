/* Followers (follower.h). */
#include "util/follower.h"

#include "util/clock.h"
#include "util/error.h"

#include <stdio.h>

/* The thread: waits for `every` changes (or the last call, or stop), calls run outside the
 * lock, and keeps its times and the first failure's message. */
static void *follower_thread(void *arg)
{
    follower *f = arg;
    pthread_mutex_lock(&f->lock);
    for (;;) {
        while (!f->stop && !f->last && f->stored - f->seen < f->every)
            pthread_cond_wait(&f->wake, &f->lock);
        if (f->stop || (f->last && f->stored == f->seen)) break;
        f->seen = f->stored;
        f->busy = true;
        pthread_mutex_unlock(&f->lock);
        double t = clock_seconds(), cpu = clock_thread_cpu_seconds();
        int rc = f->run(f->ctx);
        pthread_mutex_lock(&f->lock);
        f->seconds += clock_seconds() - t;
        f->cpu_seconds += clock_thread_cpu_seconds() - cpu;
        f->busy = false;
        if (rc && !f->failures++) snprintf(f->failure, sizeof f->failure, "%s", err_get());
        pthread_cond_broadcast(&f->wake);
    }
    f->busy = false;
    f->stop = true;
    pthread_cond_broadcast(&f->wake);
    pthread_mutex_unlock(&f->lock);
    return NULL;
}

bool follower_start(follower *f, long every, int (*run)(void *ctx), void *ctx)
{
    *f = (follower){.every = every, .run = run, .ctx = ctx};
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->wake, NULL);
    f->on = pthread_create(&f->thread, NULL, follower_thread, f) == 0;
    if (!f->on) {
        pthread_mutex_destroy(&f->lock);
        pthread_cond_destroy(&f->wake);
    }
    return f->on;
}

void follower_note(follower *f, long stored)
{
    if (!f->on) return;
    pthread_mutex_lock(&f->lock);
    f->stored = stored;
    pthread_cond_broadcast(&f->wake);
    pthread_mutex_unlock(&f->lock);
}

void follower_settle(follower *f, bool last, bool stop)
{
    if (!f->on) return;
    pthread_mutex_lock(&f->lock);
    if (last) f->last = true;
    if (stop) f->stop = true;
    pthread_cond_broadcast(&f->wake);
    if (!last)
        while (f->busy) pthread_cond_wait(&f->wake, &f->lock);
    pthread_mutex_unlock(&f->lock);
}

void follower_end(follower *f)
{
    if (!f->on) return;
    pthread_mutex_lock(&f->lock);
    bool last = f->last;
    pthread_mutex_unlock(&f->lock);
    if (!last) follower_settle(f, false, true);
    pthread_join(f->thread, NULL);
    pthread_mutex_destroy(&f->lock);
    pthread_cond_destroy(&f->wake);
    f->on = false;
}
