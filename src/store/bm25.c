/* BM25 over the shards of a text index (bm25.h). The formula is Robertson's BM25 as FTS5
 * documents it for bm25(): for each phrase of the query, idf * f (k1 + 1) / (f + k1 (1 - b + b
 * |D| / avgdl)), with f the phrase's instances in the row, |D| the row's tokens, k1 = 1.2, b =
 * 0.75, and idf = ln((N - n + 0.5) / (n + 0.5)) over N rows of which n hold the phrase (1e-6
 * where that is not positive). Written against the FTS5 extension API (sqlite3.h), which is all
 * SQLite offers for this: bm25() itself cannot be given statistics from elsewhere. */
#include "store/bm25.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define BM25_K1 1.2
#define BM25_B 0.75
#define BM25_IDF_FLOOR 1e-6 /* a phrase that half the rows or more hold */

/* The FTS5 API of `db` (NULL where FTS5 is missing or too old). */
static fts5_api *fts5_of(sqlite3 *db)
{
    fts5_api *api = NULL;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, "SELECT fts5(?1)", -1, &st, NULL) == SQLITE_OK) {
        sqlite3_bind_pointer(st, 1, (void *)&api, "fts5_api_ptr", NULL);
        sqlite3_step(st);
    }
    sqlite3_finalize(st);
    return api && api->iVersion >= 2 ? api : NULL;
}

static int count_row(const Fts5ExtensionApi *api, Fts5Context *fts, void *rows)
{
    (void)api;
    (void)fts;
    (*(int64_t *)rows)++;
    return SQLITE_OK;
}

static void hits_function(const Fts5ExtensionApi *api, Fts5Context *fts, sqlite3_context *ctx,
                          int count, sqlite3_value **values)
{
    (void)count;
    (void)values;
    int phrases = api->xPhraseCount(fts);
    int64_t *hits = calloc(phrases > 0 ? (size_t)phrases : 1, sizeof *hits);
    if (!hits) {
        sqlite3_result_error_nomem(ctx);
        return;
    }
    int rc = SQLITE_OK;
    for (int i = 0; i < phrases && rc == SQLITE_OK; i++)
        rc = api->xQueryPhrase(fts, i, &hits[i], count_row);
    if (rc != SQLITE_OK) {
        free(hits);
        sqlite3_result_error_code(ctx, rc);
        return;
    }
    sqlite3_result_blob(ctx, hits, phrases * (int)sizeof *hits, free);
}

static void score_function(const Fts5ExtensionApi *api, Fts5Context *fts, sqlite3_context *ctx,
                           int count, sqlite3_value **values)
{
    int phrases = api->xPhraseCount(fts);
    if (count != 1 || sqlite3_value_type(values[0]) != SQLITE_BLOB ||
        sqlite3_value_bytes(values[0]) != (phrases + 1) * (int)sizeof(double)) {
        sqlite3_result_error(ctx, "embedrag_bm25: the weights do not fit the query", -1);
        return;
    }
    /* The weights (copied: the blob may not be aligned for doubles), then each phrase's
     * instances in the row. */
    size_t need = 2 * ((size_t)phrases + 1);
    double local[66], *w = need <= 66 ? local : malloc(need * sizeof *w);
    if (!w) {
        sqlite3_result_error_nomem(ctx);
        return;
    }
    double *frequency = w + phrases + 1;
    memcpy(w, sqlite3_value_blob(values[0]), ((size_t)phrases + 1) * sizeof *w);
    for (int i = 0; i < phrases; i++) frequency[i] = 0.0;
    int instances = 0, length = 0;
    int rc = api->xInstCount(fts, &instances);
    for (int i = 0; i < instances && rc == SQLITE_OK; i++) {
        int phrase = 0, column = 0, offset = 0;
        rc = api->xInst(fts, i, &phrase, &column, &offset);
        if (rc == SQLITE_OK && phrase >= 0 && phrase < phrases) frequency[phrase] += 1.0;
    }
    if (rc == SQLITE_OK) rc = api->xColumnSize(fts, -1, &length);
    if (rc == SQLITE_OK) {
        double avgdl = w[0], d = (double)length, score = 0.0;
        for (int i = 0; i < phrases; i++) {
            double f = frequency[i];
            score += w[1 + i] *
                     ((f * (BM25_K1 + 1.0)) / (f + BM25_K1 * (1 - BM25_B + BM25_B * d / avgdl)));
        }
        sqlite3_result_double(ctx, score);
    } else {
        sqlite3_result_error_code(ctx, rc);
    }
    if (w != local) free(w);
}

int bm25_register(sqlite3 *db)
{
    fts5_api *api = fts5_of(db);
    if (!api) return SQLITE_ERROR;
    int rc = api->xCreateFunction(api, "embedrag_bm25_hits", NULL, hits_function, NULL);
    if (rc == SQLITE_OK)
        rc = api->xCreateFunction(api, "embedrag_bm25", NULL, score_function, NULL);
    return rc;
}

/* One SQLite varint (as FTS5 writes them): up to 8 bytes of 7 bits, high bit set where more
 * follow, and a ninth of 8 bits. Returns the bytes read, 0 where `size` ends first. */
static size_t get_varint(const unsigned char *p, size_t size, uint64_t *value)
{
    uint64_t v = 0;
    for (size_t i = 0; i < 9 && i < size; i++) {
        if (i == 8) {
            *value = (v << 8) | p[i];
            return 9;
        }
        v = (v << 7) | (p[i] & 0x7f);
        if (!(p[i] & 0x80)) {
            *value = v;
            return i + 1;
        }
    }
    return 0;
}

int bm25_totals(sqlite3 *db, int64_t *rows, int64_t *tokens)
{
    *rows = *tokens = 0;
    sqlite3_stmt *st = NULL;
    /* FTS5's "averages" record, row 1 of its data table: the row count, then each column's
     * tokens (what bm25() reads through xRowCount and xColumnTotalSize). */
    int rc = sqlite3_prepare_v2(db, "SELECT block FROM main.chunk_text_data WHERE id = 1", -1, &st,
                                NULL);
    if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        const unsigned char *p = sqlite3_column_blob(st, 0);
        size_t size = (size_t)sqlite3_column_bytes(st, 0);
        uint64_t n = 0, t = 0;
        size_t a = p ? get_varint(p, size, &n) : 0;
        size_t b = a ? get_varint(p + a, size - a, &t) : 0;
        if (b) {
            *rows = (int64_t)n;
            *tokens = (int64_t)t;
            rc = SQLITE_OK;
        } else {
            rc = size ? SQLITE_CORRUPT : SQLITE_OK; /* an empty record: an empty index */
        }
    } else if (rc == SQLITE_DONE) {
        rc = SQLITE_OK;
    }
    sqlite3_finalize(st);
    return rc;
}

void *bm25_weights(int64_t rows, int64_t tokens, const int64_t *hits, int phrases, size_t *bytes)
{
    *bytes = ((size_t)phrases + 1) * sizeof(double);
    double *w = malloc(*bytes);
    if (!w) return NULL;
    w[0] = rows > 0 ? (double)tokens / (double)rows : 1.0;
    for (int i = 0; i < phrases; i++) {
        double idf = log((rows - hits[i] + 0.5) / (hits[i] + 0.5));
        w[1 + i] = idf <= 0.0 ? BM25_IDF_FLOOR : idf;
    }
    return w;
}
