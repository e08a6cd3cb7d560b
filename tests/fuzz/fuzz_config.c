/* libFuzzer target for config.json parsing: any byte string must either give a config within
 * the documented bounds or fail with a message, never crash or leak. */
#include "model/model.h"

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    model_config config;
    if (model_config_parse((const char *)data, size, "config.json", &config) != 0) return 0;
    /* What later stages rely on: positive sizes and whole heads. */
    if (config.hidden_size <= 0 || config.num_heads <= 0 || config.num_layers <= 0 ||
        config.hidden_size % config.num_heads != 0 || config.max_seq_length <= 0 ||
        config.max_seq_length > config.max_position_embeddings || !(config.layer_norm_eps > 0))
        __builtin_trap();
    model_config_free(&config);
    return 0;
}
