/* Row-wise operations of a BERT layer (LayerNorm): plain C loops that GCC vectorizes per target
 * (target_clones), with reductions in REDUCE_LANES fixed lanes so a row's result never depends on
 * the machine's vector width. */
#include "backend/cpu/kernels_internal.h"

static inline float sum_squared_deviation(const float *x, int n, float mean)
{
    float lanes[REDUCE_LANES] = {0};
    int i = 0;
    for (; i + REDUCE_LANES <= n; i += REDUCE_LANES)
        for (int l = 0; l < REDUCE_LANES; l++) {
            float d = x[i + l] - mean;
            lanes[l] += d * d;
        }
    for (int l = 0; i + l < n; l++) {
        float d = x[i + l] - mean;
        lanes[l] += d * d;
    }
    for (int width = REDUCE_LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) lanes[l] += lanes[l + width];
    return lanes[0];
}

CLONES void cpu_layer_norm(float *y, const float *x, int n, const float *gamma, const float *beta,
                           float eps)
{
    float mean = sum_fixed(x, n) / (float)n;
    float var = sum_squared_deviation(x, n, mean) / (float)n;
    float inv = 1.0f / sqrtf(var + eps);
    for (int i = 0; i < n; i++) y[i] = (x[i] - mean) * inv * gamma[i] + beta[i];
}
