/* libFuzzer target for the safetensors header parser: any byte string must either parse into
 * tensors whose ranges lie inside the input, or fail with a message, never crash or leak. */
#include "model/model.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_file *file;
    if (st_parse(data, size, "fuzz.safetensors", &file) != 0) return 0;
    /* Touch every byte each tensor claims, so ASan reports any range the parser let through
     * that reaches outside the input. */
    volatile uint8_t sink = 0;
    for (int i = 0; i < file->tensor_count; i++) {
        const st_tensor *t = &file->tensors[i];
        const uint8_t *bytes = t->data;
        for (size_t j = 0; j < t->nbytes; j++) sink ^= bytes[j];
        if (st_find(file, t->name) != t) __builtin_trap();
    }
    (void)sink;
    st_close(file);
    return 0;
}
