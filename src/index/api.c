/* The document store's public API (embedrag.h): a thin layer over the store, the indexer and
 * the searcher that the CLI uses too, owning the copies of result strings a caller reads. */
#include "embedrag.h"

#include "index/indexer.h"
#include "index/search.h"
#include "store/store.h"
#include "util/error.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct embedrag_store {
    store *store;
    embedrag_model *model;
    embedrag_store_params params;
    index_options options;
    char hash[17];
    searcher *searcher; /* opened at the first search */
    bool changed;       /* whether this handle stored or deleted anything */
    search_hit *hits;
    int hits_capacity;
    char *strings; /* the last results' strings */
    size_t strings_capacity;
    /* The last embedrag_store_get_document's strings and chunks. */
    char *document_strings;
    embedrag_chunk *document_chunks;
};

embedrag_store_params embedrag_store_default_params(void)
{
    return (embedrag_store_params){.read_only = false, .threads = 0, .overlap_tokens = -1};
}

embedrag_search_params embedrag_search_default_params(void)
{
    return (embedrag_search_params){.k = 10, .mode = EMBEDRAG_SEARCH_DENSE};
}

int embedrag_store_open(const char *path, embedrag_model *model,
                        const embedrag_store_params *params, embedrag_store **out)
{
    if (!out) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_store_open: out is NULL");
    *out = NULL;
    embedrag_store_params defaults = embedrag_store_default_params();
    if (!params) params = &defaults;
    if (!path || (!params->read_only && !model))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "embedrag_store_open: a path and, unless read_only, a model");
    err_clear();
    embedrag_store *s = calloc(1, sizeof *s);
    if (!s) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory opening %s", path);
    s->model = model;
    s->params = *params;
    s->options = (index_options){.overlap_tokens = params->overlap_tokens};
    int rc;
    if (params->read_only) {
        rc = store_open(path, NULL, true, &s->store);
    } else {
        store_model identity;
        rc = index_model_identity(model, &identity, s->hash);
        if (!rc) rc = store_open(path, &identity, false, &s->store);
    }
    if (!rc && model) {
        embedrag_model_info info;
        embedrag_model_get_info(model, &info);
        const store_model *sm = store_get_model(s->store);
        if (strcmp(sm->name, info.name) != 0 || sm->dimension != info.dimension)
            rc = err_set(EMBEDRAG_ERR_MODEL_MISMATCH,
                         "%s was built with %s (%d dimensions); the model given is %s (%d)", path,
                         sm->name, sm->dimension, info.name, info.dimension);
    }
    if (rc) {
        store_close(s->store);
        free(s);
        return rc;
    }
    *out = s;
    return 0;
}

void embedrag_store_close(embedrag_store *s)
{
    if (!s) return;
    /* Leaves the search copy and the codes current for the next open (a failure only slows
     * that open). */
    if (s->changed) {
        if (s->searcher)
            searcher_refresh(s->searcher); /* loads again only what changed since the last search */
        else if (searcher_open(s->store, NULL, s->params.threads, &s->searcher) != 0)
            s->searcher = NULL;
    }
    searcher_close(s->searcher);
    store_close(s->store);
    free(s->hits);
    free(s->strings);
    free(s->document_strings);
    free(s->document_chunks);
    free(s);
}

static int need_writer(const embedrag_store *s, const char *what)
{
    if (s->params.read_only || !s->model)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "%s: the store was opened read-only (or without a model)", what);
    return 0;
}

int embedrag_store_add(embedrag_store *s, const embedrag_document *documents, size_t count,
                       int *statuses)
{
    if (!s || (count && !documents))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_store_add: NULL argument");
    int rc = need_writer(s, "embedrag_store_add");
    if (rc) return rc;
    index_summary summary = {0};
    indexer *ix = NULL;
    rc = indexer_open(s->model, s->store, &s->options, &summary, &ix);
    long bad = 0;
    char first[512] = "";
    for (size_t i = 0; i < count && !rc; i++) {
        const embedrag_document *d = &documents[i];
        int *status = statuses ? &statuses[i] : NULL;
        if (!d->id || !d->text) {
            if (status) *status = EMBEDRAG_ERR_INVALID_ARGUMENT;
            if (!bad++)
                snprintf(first, sizeof first, "document %zu: %s", i,
                         d->id ? "its text is NULL" : "its id is NULL");
            continue;
        }
        index_document doc = {.key = d->id,
                              .text = d->text,
                              .length = d->length || !d->text[0] ? d->length : strlen(d->text),
                              .title = d->title,
                              .metadata = d->metadata,
                              .source = d->source,
                              .vector = d->vector};
        rc = indexer_add_document(ix, &doc, status);
    }
    if (!rc) rc = indexer_flush(ix);
    indexer_close(ix);
    if (summary.indexed) s->changed = true;
    if (rc) return rc;
    if (bad || summary.failed)
        err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "%ld of %zu documents were not added; the first: %s",
                bad + summary.failed, count, bad ? first : summary.first_failure);
    return 0;
}

int embedrag_store_add_path(embedrag_store *s, const char *path, long *failed)
{
    if (failed) *failed = 0;
    if (!s || !path)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_store_add_path: NULL argument");
    int rc = need_writer(s, "embedrag_store_add_path");
    if (rc) return rc;
    index_summary summary = {0};
    indexer *ix = NULL;
    rc = indexer_open(s->model, s->store, &s->options, &summary, &ix);
    if (!rc) rc = indexer_add_path(ix, path);
    if (!rc) rc = indexer_flush(ix);
    indexer_close(ix);
    if (summary.indexed) s->changed = true;
    if (failed) *failed = summary.failed;
    if (!rc && summary.failed) err_set(EMBEDRAG_ERR_IO, "%s", summary.first_failure);
    return rc;
}

int embedrag_store_delete(embedrag_store *s, const char *id, bool *found)
{
    bool was = false;
    if (found) *found = false;
    if (!s || !id) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_store_delete: NULL");
    int rc = need_writer(s, "embedrag_store_delete");
    if (!rc) rc = store_delete_document(s->store, id, &was);
    if (was) s->changed = true;
    if (found) *found = was;
    return rc;
}

/* Copies the hits' chunks into results, their strings into the handle's buffer. */
static int fill_results(embedrag_store *s, int n, embedrag_search_result *results)
{
    size_t used = 0;
    /* Offsets first (the buffer may move while it grows), pointers at the end. */
    size_t offsets[5];
    const size_t none = SIZE_MAX;
    size_t *all = malloc((size_t)(n ? n : 1) * 5 * sizeof *all);
    if (!all) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) {
        store_chunk_info info;
        rc = store_get_chunk(s->store, s->hits[i].chunk_id, &info);
        if (rc) break;
        const char *strings[5] = {info.document_key, info.source, info.title, info.metadata,
                                  info.text};
        for (int j = 0; j < 5 && !rc; j++) {
            if (!strings[j]) {
                offsets[j] = none;
                continue;
            }
            size_t len = strlen(strings[j]) + 1;
            if (used + len > s->strings_capacity) {
                size_t grown = s->strings_capacity ? s->strings_capacity : 4096;
                while (grown < used + len) grown *= 2;
                char *more = realloc(s->strings, grown);
                if (!more) {
                    rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
                    break;
                }
                s->strings = more;
                s->strings_capacity = grown;
            }
            memcpy(s->strings + used, strings[j], len);
            offsets[j] = used;
            used += len;
        }
        memcpy(all + (size_t)i * 5, offsets, sizeof offsets);
        results[i] = (embedrag_search_result){
            .score = s->hits[i].score, .chunk = info.ordinal, .start = info.start, .end = info.end};
    }
    for (int i = 0; i < n && !rc; i++) {
        const char **fields[5] = {&results[i].document, &results[i].source, &results[i].title,
                                  &results[i].metadata, &results[i].text};
        for (int j = 0; j < 5; j++) {
            size_t at = all[(size_t)i * 5 + j];
            *fields[j] = at == none ? NULL : s->strings + at;
        }
    }
    free(all);
    return rc;
}

typedef struct search_request {
    const char *query;
    const float *vector;
} search_request;

static int search(embedrag_store *s, search_request request, const embedrag_search_params *params,
                  embedrag_search_result *results, int *found)
{
    if (found) *found = 0;
    embedrag_search_params defaults = embedrag_search_default_params();
    if (!params) params = &defaults;
    if (!s || !results || !found || params->k < 1 || params->metadata_count < 0 ||
        (params->metadata_count && (!params->metadata_keys || !params->metadata_values)))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "embedrag_store_search: NULL argument, k < 1, or metadata filters "
                       "without keys or values");
    if (params->mode != EMBEDRAG_SEARCH_DENSE && params->mode != EMBEDRAG_SEARCH_BM25 &&
        params->mode != EMBEDRAG_SEARCH_HYBRID)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_store_search: unknown mode %d",
                       (int)params->mode);
    err_clear();
    int rc = 0;
    if (!s->searcher) rc = searcher_open(s->store, s->model, s->params.threads, &s->searcher);
    if (!rc && params->k > s->hits_capacity) {
        search_hit *grown = realloc(s->hits, (size_t)params->k * sizeof *grown);
        if (!grown) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
        s->hits = grown;
        s->hits_capacity = params->k;
    }
    if (rc) return rc;
    store_filter filter = {.source_glob = params->source_glob,
                           .keys = params->metadata_keys,
                           .values = params->metadata_values,
                           .count = params->metadata_count};
    searcher_set_exact(s->searcher, params->exact);
    int n = 0;
    static const search_mode modes[] = {SEARCH_DENSE, SEARCH_BM25, SEARCH_HYBRID};
    rc = request.vector
             ? searcher_search_vector(s->searcher, request.vector, params->k, &filter, s->hits, &n)
             : searcher_search(s->searcher, request.query, modes[params->mode], params->k, &filter,
                               s->hits, &n);
    if (!rc) rc = fill_results(s, n, results);
    if (!rc) *found = n;
    return rc;
}

int embedrag_store_search(embedrag_store *s, const char *query,
                          const embedrag_search_params *params, embedrag_search_result *results,
                          int *found)
{
    if (!query) {
        if (found) *found = 0;
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_store_search: query is NULL");
    }
    return search(s, (search_request){.query = query}, params, results, found);
}

int embedrag_store_search_vector(embedrag_store *s, const float *vector,
                                 const embedrag_search_params *params,
                                 embedrag_search_result *results, int *found)
{
    if (!vector) {
        if (found) *found = 0;
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "embedrag_store_search_vector: vector is NULL");
    }
    return search(s, (search_request){.vector = vector}, params, results, found);
}

/* One document's chunks as gathered: the records, and their strings in one block whose
 * offsets become pointers once it stops growing. */
typedef struct document_gather {
    char *strings;
    size_t used, capacity;
    embedrag_chunk *chunks;
    size_t *texts; /* each chunk's text offset in strings */
    int count, room;
    size_t fields[4]; /* the document's id, source, title, metadata (SIZE_MAX: NULL) */
} document_gather;

/* Copies text into the block; SIZE_MAX for NULL; *failed on no memory. */
static size_t gather_string(document_gather *g, const char *text, bool *failed)
{
    if (!text) return SIZE_MAX;
    size_t n = strlen(text) + 1;
    if (g->used + n > g->capacity) {
        size_t grown = g->capacity ? g->capacity : 4096;
        while (grown < g->used + n) grown *= 2;
        char *more = realloc(g->strings, grown);
        if (!more) {
            *failed = true;
            return SIZE_MAX;
        }
        g->strings = more;
        g->capacity = grown;
    }
    memcpy(g->strings + g->used, text, n);
    g->used += n;
    return g->used - n;
}

static int gather_chunk(void *ctx, const store_chunk_info *c)
{
    document_gather *g = ctx;
    bool failed = false;
    if (g->count == 0 && g->used == 0) {
        const char *fields[4] = {c->document_key, c->source, c->title, c->metadata};
        for (int i = 0; i < 4; i++) g->fields[i] = gather_string(g, fields[i], &failed);
    }
    if (c->text && !failed) {
        if (g->count == g->room) {
            int room = g->room ? 2 * g->room : 16;
            embedrag_chunk *chunks = realloc(g->chunks, (size_t)room * sizeof *chunks);
            if (chunks) g->chunks = chunks;
            size_t *texts = chunks ? realloc(g->texts, (size_t)room * sizeof *texts) : NULL;
            if (texts) g->texts = texts;
            if (!chunks || !texts) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
            g->room = room;
        }
        g->texts[g->count] = gather_string(g, c->text, &failed);
        g->chunks[g->count++] = (embedrag_chunk){
            .chunk = c->ordinal, .start = c->start, .end = c->end, .tokens = c->tokens};
    }
    return failed ? err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory") : 0;
}

int embedrag_store_get_document(embedrag_store *s, const char *id, embedrag_document_info *info)
{
    if (!s || !id || !info)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_store_get_document: NULL");
    memset(info, 0, sizeof *info);
    free(s->document_strings);
    free(s->document_chunks);
    s->document_strings = NULL;
    s->document_chunks = NULL;
    document_gather g = {0};
    bool found = false;
    int rc = store_document_chunks(s->store, id, &found, gather_chunk, &g);
    if (!rc && !found) rc = err_set(EMBEDRAG_ERR_NOT_FOUND, "no document with id '%s'", id);
    if (rc) {
        free(g.strings);
        free(g.chunks);
        free(g.texts);
        return rc;
    }
    for (int i = 0; i < g.count; i++) g.chunks[i].text = g.strings + g.texts[i];
    free(g.texts);
    const char *fields[4];
    for (int i = 0; i < 4; i++)
        fields[i] = g.fields[i] == SIZE_MAX ? NULL : g.strings + g.fields[i];
    s->document_strings = g.strings;
    s->document_chunks = g.chunks;
    *info = (embedrag_document_info){.id = fields[0],
                                     .source = fields[1],
                                     .title = fields[2],
                                     .metadata = fields[3],
                                     .chunks = g.chunks,
                                     .chunk_count = g.count};
    return 0;
}

int embedrag_store_get_info(embedrag_store *s, embedrag_store_info *info)
{
    if (!s || !info) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_store_get_info: NULL");
    store_stats st;
    int rc = store_get_stats(s->store, &st);
    if (rc) return rc;
    const store_model *m = store_get_model(s->store);
    *info = (embedrag_store_info){.documents = st.documents,
                                  .chunks = st.chunks,
                                  .tokens = st.tokens,
                                  .bytes_on_disk = st.file_bytes,
                                  .search_copy_bytes = st.search_copy_bytes,
                                  .search_copy_current = st.search_copy_current,
                                  .model = m->name,
                                  .dimension = m->dimension};
    return 0;
}
