/* The backend factory and the helpers every backend shares. The factory is the one place that
 * knows which kinds this build includes, so that the engine asks for a kind and gets either a
 * backend or EMBEDRAG_ERR_UNSUPPORTED with the reason, never an #ifdef. */
#include "backend/backend.h"

#include "util/error.h"

#include <stdio.h>
#include <string.h>

int backend_create(const backend_params *params, const model_config *config,
                   const model_weights *weights, backend **out)
{
    *out = NULL;
    switch (params->kind) {
    case BACKEND_CPU:
    case BACKEND_FAKE_GPU:
        return cpu_backend_create(params, config, weights, out);
    case BACKEND_CUDA:
#ifdef EMBEDRAG_HAVE_CUDA
        return cuda_backend_create(params, config, weights, out);
#else
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "this build of embedrag has no GPU backend (it was configured without the "
                       "CUDA toolkit; install it and rebuild)");
#endif
    }
    return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "unknown backend kind %d", (int)params->kind);
}

int backend_device_count(backend_kind kind)
{
    switch (kind) {
    case BACKEND_CPU:
        return 1;
    case BACKEND_CUDA:
#ifdef EMBEDRAG_HAVE_CUDA
        return cuda_backend_device_count();
#else
        return 0;
#endif
    case BACKEND_FAKE_GPU:
        return 0; /* opened only on request (EMBEDRAG_TEST_FAKE_GPUS) */
    }
    return 0;
}

int backend_load_layers(backend *b, const model_weights *weights)
{
    for (int l = 0; l < weights->layer_count; l++) {
        int rc = b->ops->load_layer(b, weights, l);
        if (rc) return rc;
    }
    return 0;
}

void backend_destroy(backend *b)
{
    if (b) b->ops->destroy(b);
}

void backend_ticket_fail(backend_ticket *ticket, int status)
{
    ticket->status = status;
    snprintf(ticket->message, sizeof ticket->message, "%s", err_get());
    ticket->done = true;
}

int backend_ticket_status(const backend_ticket *ticket)
{
    if (ticket->status == 0) return 0;
    return err_set(ticket->status, "%s", ticket->message);
}

double backend_batch_flops(const model_config *config, int tokens, int sequences, int max_len)
{
    double h = config->hidden_size, inter = config->intermediate_size;
    /* Per token and layer: Q, K, V and the attention output (4 H^2 multiply-adds) and the two
     * feed-forward matrices (2 H I); per sequence of length L: scores and weighted values
     * (2 L^2 H). Lengths are not known one by one here: the mean length stands in for them,
     * capped by the longest. */
    double mean_len = sequences > 0 ? (double)tokens / sequences : 0.0;
    if (mean_len > max_len) mean_len = max_len;
    double linear = 2.0 * (4.0 * h * h + 2.0 * h * inter) * tokens;
    double attention = 4.0 * h * mean_len * tokens;
    return (linear + attention) * config->num_layers;
}
