/* A monotonic clock in seconds, for the timings the engine and the indexer keep (cost estimates,
 * calibration, progress) and the command line's reports. */
#ifndef EMBEDRAG_UTIL_CLOCK_H
#define EMBEDRAG_UTIL_CLOCK_H

/* Seconds on CLOCK_MONOTONIC (from an arbitrary start; differences only). Thread-safe. */
double clock_seconds(void);

/* Seconds of CPU time the calling thread has used (differences only). */
double clock_thread_cpu_seconds(void);

#endif
