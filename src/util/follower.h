/* A follower: a thread that keeps up with a writer's progress, calling `run` each time `every`
 * more changes were made since its last call, once more when asked for a last one, until told to
 * stop. The indexer follows its store with them (each text index file's updates, the WAL's
 * checkpoints). A failed call is counted, its message kept (the first), and the thread goes on:
 * the writer's own work at the end (its text update, SQLite's checkpoints) makes good what failed
 * calls left undone, and says why where it fails too. */
#ifndef EMBEDRAG_UTIL_FOLLOWER_H
#define EMBEDRAG_UTIL_FOLLOWER_H

#include <pthread.h>
#include <stdbool.h>

typedef struct follower {
    bool on; /* the thread was started */
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    bool busy, stop, last; /* under lock */
    long stored, seen;     /* under lock: changes made; those of its last call */
    long every;
    int (*run)(void *ctx);
    void *ctx;
    /* Read after follower_end (or under lock). */
    double seconds;     /* its calls, in all */
    double cpu_seconds; /* the CPU time they used (less than `seconds` where it waited) */
    long failures;      /* calls that returned non-zero */
    char failure[256];  /* the first one's message (err_get on its thread) */
} follower;

/* Starts `f`'s thread, which calls run(ctx) every `every` changes; false when no thread could be
 * started (then the caller does the work itself, and the other calls are no-ops). */
bool follower_start(follower *f, long every, int (*run)(void *ctx), void *ctx);

/* Tells `f` how many changes were made in all. */
void follower_note(follower *f, long stored);

/* Waits for the call in progress, if any. `last`: asks for one more call for whatever changed
 * since the last (none where nothing did), then ends the thread, without waiting for it; `stop`:
 * ends it at once. */
void follower_settle(follower *f, bool last, bool stop);

/* Ends `f` (after the last call, where one was asked for) and waits for its thread. */
void follower_end(follower *f);

#endif
