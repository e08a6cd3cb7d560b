/* The seam between policy (the engine) and mechanism (a backend). A backend reads the model's
 * immutable weight views once into its own layout, says what it can do (capabilities and a cost
 * estimate the engine's router asks), and turns packed batches of token ids into pooled,
 * unnormalized vectors on streams of its own. The CPU backend is the reference; every other
 * backend is tested against it (tests/test_backend.c). */
#ifndef EMBEDRAG_BACKEND_H
#define EMBEDRAG_BACKEND_H

#include "model/model.h"

#include "embedrag.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum backend_kind {
    BACKEND_CPU,
    BACKEND_CUDA,
    /* A stand-in GPU for tests of the engine's multi-device and failure paths on machines with
     * none: a CPU backend of one thread that calls itself "fake-gpu:N", may fail every batch
     * after a count (EMBEDRAG_ERR_DEVICE, as a GPU that fails mid-run) and may refuse
     * reservations above a size (EMBEDRAG_ERR_NO_MEMORY). The engine opens these instead of CUDA
     * devices when EMBEDRAG_TEST_FAKE_GPUS is set (engine.c says how). */
    BACKEND_FAKE_GPU,
} backend_kind;

typedef struct backend_params {
    backend_kind kind;
    int device;                   /* which GPU (CUDA ordinal); ignored by the CPU */
    int threads;                  /* CPU worker threads; 0 = one per online core */
    embedrag_precision precision; /* asked for; a backend runs the closest it can */
    /* BACKEND_FAKE_GPU only: batches that succeed before every later one fails (< 0: never),
     * and the most tokens a reservation may hold (0: no limit). */
    int fail_after;
    int memory_tokens;
} backend_params;

/* What a backend is and can do; filled at creation, constant afterwards. */
typedef struct backend_caps {
    const char *name;             /* "cpu", "cuda:0" */
    const char *device;           /* the hardware, for people: "AMD EPYC (avx512, 2 threads)" */
    const char *kernels;          /* the GEMM kernels that run: "avx512", "amx-bf16", ... */
    embedrag_precision precision; /* the arithmetic it runs (not just what was asked for) */
    int preferred_batch_tokens;   /* a bulk batch this large keeps the device busy */
    int max_batch_tokens;         /* the most tokens reserve accepts (memory) */
    size_t memory_available;      /* bytes free for activations, 0 when unknown */
    /* The device's peak rate for the arithmetic it runs, FLOP/s (a GPU's dense tensor rate at
     * its highest clock), for fractions of peak; 0 when unknown. */
    double peak_flops;
    /* The backend reads the embedding tables from the weight views while it runs (so their
     * pages must stay mapped in); false when it copied them. */
    bool reads_embeddings_in_place;
} backend_caps;

/* Sequences packed back to back without padding: sequence i is ids[offsets[i] .. offsets[i+1]),
 * starting with [CLS] and ending with [SEP]. The first pool_skip[i] tokens ([CLS] counted) are
 * left out of mean and max pooling, as sentence-transformers does for a prompt when the pooling
 * config says include_prompt = false; pool_skip may be NULL (nothing skipped). The engine
 * validates ids (0 <= id < vocab_size) and lengths (1 ..= max_position_embeddings) once; a
 * backend trusts them. For an asynchronous backend the arrays must stay valid until the ticket
 * is waited on (take them from host_alloc). */
typedef struct backend_batch {
    const int32_t *ids;
    const int *offsets; /* count + 1 entries */
    int count;
    int tokens;  /* offsets[count] */
    int max_len; /* the longest sequence */
    const int *pool_skip;
} backend_batch;

/* Streams of different priority may run at once: work on a latency stream goes ahead of bulk
 * work already running (the CPU backend pauses a bulk batch between two steps of its forward
 * pass; a GPU maps this to stream priorities). */
typedef enum backend_priority {
    BACKEND_PRIORITY_BULK,
    BACKEND_PRIORITY_LATENCY,
} backend_priority;

typedef struct backend backend;
/* A queue of work with its own buffers; used by one thread at a time. */
typedef struct backend_stream backend_stream;

/* The ticket of one submitted batch. It carries the status and message of a failure that
 * happened wherever the work ran; backend_wait re-raises it on the waiting thread. */
#define BACKEND_MESSAGE_SIZE 512
typedef struct backend_ticket {
    int status;
    bool done;
    /* Seconds the device spent on the batch once it is done: a GPU's from events around the
     * upload, the forward pass and the download; the CPU's its compute time. */
    double device_seconds;
    char message[BACKEND_MESSAGE_SIZE];
} backend_ticket;

typedef struct backend_ops {
    /* Copies encoder layer `layer` from the weight views into the backend's own layout. The
     * engine calls it for every layer in order after backend_create (then drops that layer's
     * host pages, so loading never holds the whole file and its copy at once); no batch runs
     * before every layer is loaded. */
    int (*load_layer)(backend *self, const model_weights *weights, int layer);
    /* Seconds a batch of this shape would take on an idle device (a model of the FLOPs,
     * corrected by what completed batches measured). Thread-safe. */
    double (*estimate_seconds)(backend *self, int tokens, int sequences, int max_len);
    /* Replaces the estimate's parameters (seconds a batch costs whatever its size, and seconds
     * per FLOP) with what the engine measured at open; completed batches keep refining them. */
    void (*set_cost)(backend *self, double overhead_seconds, double seconds_per_flop);
    int (*stream_create)(backend *self, backend_priority priority, backend_stream **out);
    void (*stream_destroy)(backend_stream *stream);
    /* Sizes the stream's buffers for batches up to these bounds, once: later batches within
     * them run at fixed addresses (as CUDA graphs need). Calling it again only grows them. */
    int (*reserve)(backend_stream *stream, int max_tokens, int max_sequences, int max_len);
    /* Host memory the device reads from and writes to fastest (pinned for a GPU). */
    void *(*host_alloc)(backend *self, size_t bytes);
    void (*host_free)(backend *self, void *memory);
    /* Starts the batch (within the reservation) and returns at once or when done; out receives
     * count rows of the hidden width (host memory from host_alloc) by the time the ticket is
     * waited on. A failure to start is returned directly; a failure while running is in the
     * ticket. */
    int (*submit)(backend_stream *stream, const backend_batch *batch, float *out,
                  backend_ticket *ticket);
    /* Waits for the ticket and returns its status (setting the calling thread's error). */
    int (*wait)(backend_stream *stream, backend_ticket *ticket);
    void (*destroy)(backend *self);
} backend_ops;

struct backend {
    const backend_ops *ops;
    backend_caps caps;
};

/* Creates a backend of params->kind with the embedding tables read (their views may be released
 * afterwards unless caps.reads_embeddings_in_place); the encoder layers follow through
 * ops->load_layer. `config` must outlive the backend. A kind this build does not include, or a
 * device that is not there, is EMBEDRAG_ERR_UNSUPPORTED with a message saying why; this factory
 * is the only place that knows which kinds were compiled in. */
int backend_create(const backend_params *params, const model_config *config,
                   const model_weights *weights, backend **out);

/* How many devices of this kind can be opened (ordinals 0 .. count - 1): 1 for the CPU, the
 * visible GPUs for CUDA (0 when the build has no CUDA backend or no driver answers). */
int backend_device_count(backend_kind kind);

/* Loads every layer (for a backend used alone, as the tests do). */
int backend_load_layers(backend *b, const model_weights *weights);

/* destroy(NULL) is a no-op. */
void backend_destroy(backend *b);

/* Fills a ticket as failed with the calling thread's current error (for backends that fail
 * on a worker). */
void backend_ticket_fail(backend_ticket *ticket, int status);

/* Returns the ticket's status, re-raising its message on the calling thread when it failed. */
int backend_ticket_status(const backend_ticket *ticket);

/* The backends each kind provides (in their own directories). */
int cpu_backend_create(const backend_params *params, const model_config *config,
                       const model_weights *weights, backend **out);
int cuda_backend_create(const backend_params *params, const model_config *config,
                        const model_weights *weights, backend **out);
int cuda_backend_device_count(void);

/* FLOPs of one forward pass over a batch of this shape (linear layers plus attention): the
 * common unit of the backends' cost estimates and of the benchmarks' fraction of peak. */
double backend_batch_flops(const model_config *config, int tokens, int sequences, int max_len);

#endif
