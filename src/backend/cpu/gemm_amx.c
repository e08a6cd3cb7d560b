/* The bfloat16 GEMM on AMX tiles, for weights packed by cpu_pack_bf16: rows rounded to bfloat16,
 * 32 x 32 output blocks summed in fp32 tiles, the fp32 epilogue of one block run between the tile
 * multiplies of the next. */
#include "backend/cpu/kernels_internal.h"

#define AMX_TARGET                                                                                 \
    __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512bf16,fma")))

/* The tile configuration (palette 1): every tile 16 rows of 64 bytes. Tiles 0-3 hold a 32 x 32
 * block of fp32 sums, 4-5 two 16-row blocks of A (32 bf16 each), 6-7 the weight tiles. */
typedef struct amx_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* A stored 32 x 32 block of sums waiting for its epilogue (bias, residual, activation). */
typedef struct amx_epilogue {
    const float *sums; /* NULL: nothing pending */
    int row, rows, col0, cols, done;
    const float *bias;
    cpu_epilogue epilogue;
    const float *residual;
    float *C;
    size_t ldc;
} amx_epilogue;

/* Finishes the pending block's rows up to part / parts of them. */
AMX_TARGET static inline void amx_epilogue_part(amx_epilogue *e, int part, int parts)
{
    if (!e->sums) return;
    int end = (int)((long)e->rows * part / parts);
    if (end <= e->done) return;
    __mmask16 m0 = tail_mask(e->cols), m1 = tail_mask(e->cols - 16);
    __m512 bias0 = _mm512_loadu_ps(e->bias), bias1 = _mm512_loadu_ps(e->bias + 16);
    for (int i = e->done; i < end; i++) {
        size_t at = (size_t)(e->row + i) * e->ldc + (size_t)e->col0;
        finish_row(_mm512_load_ps(e->sums + i * 32), _mm512_load_ps(e->sums + i * 32 + 16), bias0,
                   bias1, e->residual ? e->residual + at : NULL, e->C + at, m0, m1, e->epilogue);
    }
    e->done = end;
    if (e->done == e->rows) e->sums = NULL;
}

/* One task of a GEMM against cpu_pack_bf16 weights: the block's rows are rounded to bfloat16
 * into scratch (zero-padded to 16 rows and k_pad columns), then for each 32-row pair of tiles and
 * each panel, the k blocks accumulate in tiles, which are stored to a buffer for the fp32
 * epilogue. An output element's sum depends only on its own row of A and the weights. */
AMX_TARGET void cpu_gemm_task_amx(const cpu_gemm_plan *plan, int task, const float *A, size_t lda,
                                  const cpu_packed *packed, cpu_epilogue epilogue, const float *R,
                                  float *C, size_t ldc, uint16_t *a16)
{
    int block = task / plan->panel_groups, group = task % plan->panel_groups;
    int row0 = block * plan->rows_per_block;
    int rows = plan->m - row0 < plan->rows_per_block ? plan->m - row0 : plan->rows_per_block;
    int p0 = (int)((long)group * packed->panels / plan->panel_groups);
    int p1 = (int)((long)(group + 1) * packed->panels / plan->panel_groups);
    int k = packed->k, k_pad = packed->k_pad, blocks = k_pad / 32;
    int rows16 = (rows + 15) / 16 * 16;
    const float *residual = epilogue == CPU_EPILOGUE_BIAS_RESIDUAL ? R : NULL;
    for (int r = 0; r < rows16; r++) {
        uint16_t *dst = a16 + (size_t)r * (size_t)k_pad;
        const float *src = r < rows ? A + (size_t)(row0 + r) * lda : NULL;
        for (int kk = 0; kk < k_pad; kk += 32) {
            __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
            if (src) {
                lo = _mm512_maskz_loadu_ps(tail_mask(k - kk), src + kk);
                hi = _mm512_maskz_loadu_ps(tail_mask(k - kk - 16), src + kk + 16);
            }
            _mm512_storeu_si512(dst + kk, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
    amx_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.colsb[t] = 64;
    }
    /* Loaded per task: other code on this thread (oneDNN, say) may use tiles in between. */
    _tile_loadconfig(&config);
    /* Two buffers: the fp32 epilogue of one panel (bias, residual, GELU: as long as the tile
     * multiplies themselves) runs in pieces between the next panel's tile instructions, so the
     * vector units and the tile unit work at the same time. */
    float sums[2][32 * 32] __attribute__((aligned(64)));
    size_t stride = (size_t)k_pad * sizeof(uint16_t);
    amx_epilogue pending = {.epilogue = epilogue, .residual = residual, .C = C, .ldc = ldc};
    for (int r = 0; r < rows; r += 32) {
        int rn = rows - r < 32 ? rows - r : 32;
        const char *a0 = (const char *)(a16 + (size_t)r * (size_t)k_pad);
        const char *a1 = a0 + 16 * stride;
        for (int p = p0; p < p1; p++) {
            const uint16_t *w = packed->data_amx + (size_t)p * (size_t)blocks * AMX_BLOCK_ELEMENTS;
            /* The other buffer than the pending block's, which the loop below finishes. */
            float *out = sums[pending.sums == sums[0] ? 1 : 0];
            _tile_zero(0);
            _tile_zero(1);
            if (rn > 16) {
                _tile_zero(2);
                _tile_zero(3);
                for (int kb = 0; kb < blocks; kb++) {
                    const uint16_t *wb = w + (size_t)kb * AMX_BLOCK_ELEMENTS;
                    _tile_loadd(4, a0 + kb * 64, stride);
                    _tile_loadd(5, a1 + kb * 64, stride);
                    _tile_loadd(6, wb, 64);
                    _tile_loadd(7, wb + 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                    amx_epilogue_part(&pending, kb + 1, blocks);
                }
                _tile_stored(2, out + 16 * 32, 128);
                _tile_stored(3, out + 16 * 32 + 16, 128);
            } else {
                for (int kb = 0; kb < blocks; kb++) {
                    const uint16_t *wb = w + (size_t)kb * AMX_BLOCK_ELEMENTS;
                    _tile_loadd(4, a0 + kb * 64, stride);
                    _tile_loadd(6, wb, 64);
                    _tile_loadd(7, wb + 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    amx_epilogue_part(&pending, kb + 1, blocks);
                }
            }
            _tile_stored(0, out, 128);
            _tile_stored(1, out + 16, 128);
            pending.sums = out;
            pending.row = row0 + r;
            pending.rows = rn;
            pending.col0 = p * CPU_PANEL_WIDTH;
            pending.cols = packed->n - pending.col0 < CPU_PANEL_WIDTH ? packed->n - pending.col0
                                                                      : CPU_PANEL_WIDTH;
            pending.bias = packed->bias + pending.col0;
            pending.done = 0;
        }
    }
    amx_epilogue_part(&pending, 1, 1);
    _tile_release();
}
