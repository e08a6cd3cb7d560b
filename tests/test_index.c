/* Indexing and search end to end on the real default model and real text: a folder of text and
 * Markdown files plus a JSONL file (titles, metadata, a pre-computed vector, bad lines) goes into
 * a store; a second run does no model work; a changed file is re-embedded and a deleted one
 * pruned; the stored vectors are the ones embedrag_embed gives for the same chunk text; dense,
 * BM25 and hybrid searches find a document by its own sentence; another model is refused; and
 * the same through the library API (embedrag_store_*). */
#include "embedrag.h"
#include "index/indexer.h"
#include "index/search.h"
#include "chunk/chunker.h"
#include "store/store.h"

#include "check.h"
#include "util/error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SENTENCES 600
static char *sentences[SENTENCES];
static int sentence_count;
static char dir[256], corpus[300], store_file[300], model_dir[4096];

static int load_sentences(void)
{
    sentence_count = check_stsb_sentences(sentences, SENTENCES);
    /* They go into JSON strings below: no double quotes. */
    for (int i = 0; i < sentence_count; i++)
        for (char *p = sentences[i]; *p; p++)
            if (*p == '"') *p = '\'';
    return sentence_count > 300 ? 0 : -1;
}

static void write_file(const char *name, const char *text)
{
    char path[600];
    snprintf(path, sizeof path, "%s/%s", corpus, name);
    FILE *f = fopen(path, "wb");
    fputs(text, f);
    fclose(f);
}

/* Document i: 12 consecutive sentences, as paragraphs of three. */
static char *document_text(int i, bool markdown)
{
    size_t cap = 8192, len = 0;
    char *t = malloc(cap);
    t[0] = '\0';
    if (markdown) len += (size_t)snprintf(t + len, cap - len, "# Notes %d\n\n", i);
    for (int s = 0; s < 12; s++) {
        const char *sentence = sentences[(i * 12 + s) % sentence_count];
        if (markdown && s == 6) len += (size_t)snprintf(t + len, cap - len, "\n## Part two\n\n");
        len += (size_t)snprintf(t + len, cap - len, "%s%s", sentence, s % 3 == 2 ? "\n\n" : " ");
    }
    return t;
}

static void make_corpus(void)
{
    snprintf(corpus, sizeof corpus, "%s/corpus", dir);
    mkdir(corpus, 0755);
    char sub[400];
    snprintf(sub, sizeof sub, "%s/more", corpus);
    mkdir(sub, 0755);
    for (int i = 0; i < 8; i++) {
        char name[64];
        snprintf(name, sizeof name, i < 6 ? "doc%d.txt" : "more/doc%d.md", i);
        char *t = document_text(i, i >= 6);
        write_file(name, t);
        free(t);
    }
    write_file("image.png", "\x89PNG not text");
    write_file(".hidden.txt", "hidden files are left out");
    /* JSONL: titles, metadata, a vector of the store's dimension, and bad lines. */
    size_t cap = 1 << 16, len = 0;
    char *j = malloc(cap);
    for (int i = 0; i < 5; i++)
        len += (size_t)snprintf(j + len, cap - len,
                                "{\"id\": \"j%d\", \"title\": \"Item %d\", \"text\": \"%s %s\", "
                                "\"metadata\": {\"n\": %d}}\n",
                                i, i, sentences[300 + 2 * i], sentences[301 + 2 * i], i);
    len += (size_t)snprintf(j + len, cap - len,
                            "{\"id\": 42, \"text\": \"numeric id\", \"vector\": [");
    for (int d = 0; d < 384; d++)
        len += (size_t)snprintf(j + len, cap - len, "%s%.4f", d ? "," : "", d == 0 ? 1.0 : 0.0);
    len += (size_t)snprintf(j + len, cap - len, "]}\n");
    len += (size_t)snprintf(j + len, cap - len, "not json at all\n");
    len += (size_t)snprintf(j + len, cap - len,
                            "{\"id\": \"short\", \"text\": \"x\", \"vector\": [1, 2]}\n");
    len += (size_t)snprintf(j + len, cap - len, "\n{\"text\": \"no id\"}\n");
    write_file("items.jsonl", j);
    free(j);
}

static embedrag_model *open_model(const char *name)
{
    snprintf(model_dir, sizeof model_dir, "%s/models/%s", check_source_dir(), name);
    embedrag_model_params p = embedrag_model_default_params();
    p.threads = 2;
    p.device = EMBEDRAG_DEVICE_CPU;
    embedrag_model *m = NULL;
    CHECK(embedrag_model_open(model_dir, &p, &m) == 0, "open %s: %s", name, embedrag_last_error());
    return m;
}

static int run_index(embedrag_model *m, bool prune, index_summary *s)
{
    const char *paths[] = {corpus};
    index_options o = {.store_path = store_file, .prune = prune, .overlap_tokens = -1};
    return index_paths(m, paths, 1, &o, s);
}

static void test_index_and_search(void)
{
    embedrag_model *m = open_model("all-MiniLM-L6-v2");
    if (!m) return;
    index_summary s;
    int rc = run_index(m, false, &s);
    CHECK(rc == 0, "index: %s", err_get());
    /* 8 files + 6 good JSONL lines (the numeric id with a vector among them); 3 bad lines. */
    CHECK(s.files == 9 && s.documents == 14 && s.indexed == 14 && s.failed == 3 &&
              s.skipped_files == 1 && s.vectors_given == 1 && s.chunks >= 14 && s.tokens > 0,
          "first run: %ld files, %ld documents, %ld indexed, %ld failed, %ld skipped, %ld "
          "vectors given, %ld chunks (%s)",
          s.files, s.documents, s.indexed, s.failed, s.skipped_files, s.vectors_given, s.chunks,
          s.first_failure);
    CHECK(strstr(s.first_failure, "items.jsonl:"), "the first failure names the line: %s",
          s.first_failure);
    /* Each stage's time is its own: the embedding stage holds the model's time, and the
     * calling thread's reading and waiting fit in the run. */
    CHECK(s.embed_seconds >= s.model_seconds && s.model_seconds > 0 && s.store_seconds > 0 &&
              s.chunk_seconds > 0 && s.read_seconds > 0 &&
              s.read_seconds + s.wait_seconds <= s.seconds && s.text_seconds >= 0 &&
              s.copy_seconds >= 0 && s.text_seconds + s.copy_seconds + s.prune_seconds <= s.seconds,
          "stage seconds: read %.4f, chunk %.4f, embed %.4f (model %.4f), store %.4f, wait %.4f, "
          "text %.4f, copy %.4f of %.4f",
          s.read_seconds, s.chunk_seconds, s.embed_seconds, s.model_seconds, s.store_seconds,
          s.wait_seconds, s.text_seconds, s.copy_seconds, s.seconds);
    long chunks = s.chunks;

    /* Again: nothing changed, no model work. */
    rc = run_index(m, false, &s);
    CHECK(rc == 0 && s.indexed == 0 && s.unchanged == 14 && s.tokens == 0 && s.model_seconds == 0.0,
          "second run: %ld indexed, %ld unchanged, %ld tokens", s.indexed, s.unchanged, s.tokens);

    /* The stored vectors are embedrag_embed's for the chunk text. */
    store *st = NULL;
    CHECK(store_open(store_file, NULL, true, &st) == 0, "open store: %s", err_get());
    if (st) {
        float *matrix;
        int64_t *ids;
        size_t n;
        CHECK(store_load_vectors(st, &matrix, &ids, &n, NULL) == 0 && (long)n == chunks,
              "%zu vectors for %ld chunks", n, chunks);
        int checked = 0, differ = 0;
        /* Passages are embedded with the model's passage prompt where it has one (the copy of
         * the model on the GPU machine has e5's prompts). */
        embedrag_embed_params passage = embedrag_embed_default_params();
        passage.prompt = "";
        embedrag_model_info mi;
        embedrag_model_get_info(m, &mi);
        for (int i = 0; i < mi.prompt_count; i++) {
            const char *name, *prompt;
            if (embedrag_model_get_prompt(m, i, &name, &prompt) == 0 && !strcmp(name, "passage"))
                passage.prompt = prompt;
        }
        for (size_t i = 0; i < n; i++) {
            store_chunk_info info;
            if (store_get_chunk(st, ids[i], &info) != 0 || info.tokens == 0) continue;
            /* Titled chunks were embedded as title, separator, text (the chunker's budget). */
            char buffer[8192];
            snprintf(buffer, sizeof buffer, "%s%s%s", info.title ? info.title : "",
                     info.title ? CHUNK_TITLE_SEPARATOR : "", info.text);
            float v[384];
            const char *text = buffer;
            embedrag_embed(m, &text, NULL, 1, &passage, v);
            differ += memcmp(v, matrix + i * 384, sizeof v) != 0;
            checked++;
        }
        CHECK(checked == (int)n - 1 && differ == 0,
              "%d of %d stored vectors differ from embedding the text", differ, checked);
        free(matrix);
        free(ids);

        /* Search by a document's own sentence: it comes first in every mode. */
        searcher *sr = NULL;
        CHECK(searcher_open(st, m, 2, &sr) == 0, "searcher: %s", err_get());
        const char *query = sentences[3 * 12 + 4]; /* in doc3.txt */
        static const search_mode modes[] = {SEARCH_DENSE, SEARCH_BM25, SEARCH_HYBRID};
        for (int k = 0; sr && k < 3; k++) {
            search_hit hits[5];
            int found = 0;
            rc = searcher_search(sr, query, modes[k], 5, NULL, hits, &found);
            store_chunk_info info;
            bool top = rc == 0 && found > 0 && store_get_chunk(st, hits[0].chunk_id, &info) == 0 &&
                       strstr(info.source, "doc3.txt") && strstr(info.text, query);
            CHECK(top, "mode %d: the top hit holds the query's sentence (rc %d, %d found, %s)", k,
                  rc, found, found ? info.source : "");
            for (int i = 1; i < found; i++)
                CHECK(hits[i].score <= hits[i - 1].score, "mode %d: scores descend", k);
        }
        searcher_close(sr);
        store_close(st);
    }

    /* A changed file is embedded again; a deleted one is pruned. */
    char *t = document_text(100, false);
    write_file("doc1.txt", t);
    free(t);
    char gone[600];
    snprintf(gone, sizeof gone, "%s/doc2.txt", corpus);
    unlink(gone);
    rc = run_index(m, true, &s);
    CHECK(rc == 0 && s.indexed == 1 && s.deleted == 1 && s.unchanged == 12,
          "after a change and a deletion: %ld indexed, %ld deleted, %ld unchanged", s.indexed,
          s.deleted, s.unchanged);
    embedrag_model_close(m);

    /* Another model is refused, naming both; the store is untouched. */
    char other[4096];
    snprintf(other, sizeof other, "%s/models/minilm-l12-stacked/config.json", check_source_dir());
    if (access(other, R_OK) != 0) {
        printf("skipped the other-model check: models/minilm-l12-stacked is not fetched here\n");
        return;
    }
    m = open_model("minilm-l12-stacked");
    if (m) {
        rc = run_index(m, false, &s);
        CHECK(rc == EMBEDRAG_ERR_MODEL_MISMATCH && strstr(err_get(), "all-MiniLM-L6-v2"),
              "another model: %d %s", rc, err_get());
        embedrag_model_close(m);
    }
}

/* The library API (embedrag_store_*): documents from memory with per-document statuses, search
 * by text and by vector in every mode, filters, replace, delete, a pre-computed vector, and a
 * read-only reopen without a model. Each document is one sentence, so its one chunk is the
 * sentence and a search for the sentence finds it at cosine 1. */
#define API_DOCS 590
static void test_library_api(void)
{
    embedrag_model *m = open_model("all-MiniLM-L6-v2");
    if (!m) return;
    char path[300];
    snprintf(path, sizeof path, "%s/api.db", dir);
    embedrag_store *st = NULL;
    CHECK(embedrag_store_open(path, m, NULL, &st) == 0, "open: %s", embedrag_last_error());
    if (!st) {
        embedrag_model_close(m);
        return;
    }
    static char ids[API_DOCS][16], sources[API_DOCS][32], metadata[API_DOCS][32];
    embedrag_document docs[API_DOCS];
    int statuses[API_DOCS];
    for (int i = 0; i < API_DOCS; i++) {
        snprintf(ids[i], sizeof ids[i], "doc-%03d", i);
        snprintf(sources[i], sizeof sources[i], "api/doc-%03d", i);
        snprintf(metadata[i], sizeof metadata[i], "{\"group\": %d}", i % 4);
        docs[i] = (embedrag_document){
            .id = ids[i], .text = sentences[i + 1], .source = sources[i], .metadata = metadata[i]};
    }
    docs[5].text = "bad \xff\xfe bytes";
    docs[6].text = NULL;
    int rc = embedrag_store_add(st, docs, API_DOCS, statuses);
    CHECK(rc == 0, "add: %s", embedrag_last_error());
    CHECK(statuses[5] == EMBEDRAG_ERR_INVALID_UTF8 && statuses[6] == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "statuses of the bad documents: %d %d", statuses[5], statuses[6]);
    int ok = 0;
    for (int i = 0; i < API_DOCS; i++) ok += statuses[i] == 0;
    CHECK(ok == API_DOCS - 2, "%d documents added", ok);
    embedrag_store_info info;
    CHECK(embedrag_store_get_info(st, &info) == 0 && info.documents == API_DOCS - 2 &&
              info.chunks == API_DOCS - 2 && info.dimension == 384 &&
              !strcmp(info.model, "all-MiniLM-L6-v2"),
          "info: %lld documents, %lld chunks", (long long)info.documents, (long long)info.chunks);

    /* A document read back: its fields and its one chunk; a missing id is NOT_FOUND. */
    embedrag_document_info d;
    CHECK(embedrag_store_get_document(st, "doc-007", &d) == 0 && !strcmp(d.id, "doc-007") &&
              !strcmp(d.source, "api/doc-007") && d.title == NULL &&
              !strcmp(d.metadata, "{\"group\": 3}") && d.chunk_count == 1 &&
              !strcmp(d.chunks[0].text, sentences[8]) && d.chunks[0].chunk == 0 &&
              d.chunks[0].start == 0 && d.chunks[0].end == (int64_t)strlen(sentences[8]) &&
              d.chunks[0].tokens > 2,
          "get document: %s", embedrag_last_error());
    CHECK(embedrag_store_get_document(st, "doc-005", &d) == EMBEDRAG_ERR_NOT_FOUND,
          "the document that failed to add is not there");

    /* Each sentence finds itself, with its offsets, in every mode. */
    embedrag_search_result r[10];
    int found = 0, self = 0, bm25_self = 0, hybrid_self = 0;
    embedrag_search_params sp = embedrag_search_default_params();
    sp.k = 5;
    for (int i = 10; i < 30; i++) {
        const char *q = sentences[i + 1];
        if (embedrag_store_search(st, q, &sp, r, &found) == 0 && found > 0)
            self += r[0].score > 0.9999 && !strcmp(r[0].text, q) && r[0].start == 0 &&
                    r[0].end == (int64_t)strlen(q) && r[0].chunk == 0 && r[0].metadata &&
                    !strncmp(r[0].source, "api/doc-", 8);
        sp.mode = EMBEDRAG_SEARCH_BM25;
        if (embedrag_store_search(st, q, &sp, r, &found) == 0 && found > 0)
            bm25_self += !strcmp(r[0].text, q);
        sp.mode = EMBEDRAG_SEARCH_HYBRID;
        if (embedrag_store_search(st, q, &sp, r, &found) == 0 && found > 0)
            hybrid_self += !strcmp(r[0].text, q);
        sp.mode = EMBEDRAG_SEARCH_DENSE;
    }
    CHECK(self == 20, "dense: %d of 20 sentences find themselves first", self);
    /* BM25 ranks by shared words alone: a shorter sentence with the same rare words may come
     * first. */
    CHECK(bm25_self >= 15 && hybrid_self >= 18, "bm25 %d, hybrid %d of 20", bm25_self, hybrid_self);

    /* Filters: a metadata field and a source glob. */
    static const char *const group[] = {"group"}, *const two[] = {"2"};
    sp.k = 10;
    sp.metadata_keys = group;
    sp.metadata_values = two;
    sp.metadata_count = 1;
    int outside = 0;
    for (int mode = 0; mode < 3; mode++) {
        sp.mode = (embedrag_search_mode)mode;
        /* BM25 finds only chunks sharing a word with the question that not half of all chunks
         * hold; dense and hybrid rank every chunk. */
        CHECK(embedrag_store_search(st, sentences[12], &sp, r, &found) == 0 &&
                  (mode == EMBEDRAG_SEARCH_BM25 ? found > 0 : found == 10),
              "filtered search (mode %d): %d results, %s", mode, found, embedrag_last_error());
        for (int j = 0; j < found; j++) outside += strstr(r[j].metadata, "\"group\": 2") == NULL;
    }
    CHECK(outside == 0, "%d results outside group 2", outside);
    sp = embedrag_search_default_params();
    sp.source_glob = "api/doc-00?";
    CHECK(embedrag_store_search(st, sentences[3], &sp, r, &found) == 0 && found == 8,
          "glob: %d results (doc-000..009 less the two bad ones)", found);
    for (int j = 0; j < found; j++)
        CHECK(!strncmp(r[j].document, "doc-00", 6), "glob result %s", r[j].document);

    /* By vector: the same results as by text. */
    float v[384];
    embedrag_embed_params ep = embedrag_embed_default_params();
    CHECK(embedrag_embed(m, (const char *const[]){sentences[21]}, NULL, 1, &ep, v) == 0, "embed");
    sp = embedrag_search_default_params();
    embedrag_search_result byvec[10];
    int found_vec = 0;
    CHECK(embedrag_store_search(st, sentences[21], &sp, r, &found) == 0 &&
              embedrag_store_search_vector(st, v, &sp, byvec, &found_vec) == 0 &&
              found == found_vec && found == 10,
          "by vector and by text: %d and %d", found_vec, found);
    int same = 0;
    for (int j = 0; j < found && j < found_vec; j++)
        same += !strcmp(r[j].document, byvec[j].document) && r[j].score == byvec[j].score;
    CHECK(same == found, "%d of %d results identical by vector and by text", same, found);

    /* Replace, re-add unchanged, delete, a pre-computed vector. */
    const char *replacement = "The keeper of the lighthouse paints the stairs blue.";
    embedrag_document changed = {.id = "doc-000", .text = replacement};
    CHECK(embedrag_store_add(st, &changed, 1, NULL) == 0, "replace");
    CHECK(embedrag_store_search(st, replacement, &sp, r, &found) == 0 && found > 0 &&
              !strcmp(r[0].document, "doc-000") && r[0].score > 0.9999,
          "the replaced text is found");
    CHECK(embedrag_store_add(st, docs + 10, 5, statuses) == 0 && statuses[0] == 0, "re-add");
    CHECK(embedrag_store_get_info(st, &info) == 0 && info.documents == API_DOCS - 2,
          "re-adding changes no count: %lld", (long long)info.documents);
    bool was = false;
    CHECK(embedrag_store_delete(st, "doc-011", &was) == 0 && was, "delete");
    CHECK(embedrag_store_delete(st, "doc-011", &was) == 0 && !was, "delete twice");
    CHECK(embedrag_store_search(st, sentences[12], &sp, r, &found) == 0, "search after delete");
    for (int j = 0; j < found; j++)
        CHECK(strcmp(r[j].document, "doc-011") != 0, "the deleted document is not found");
    /* A vector made elsewhere (here: the embedding of a text no document has). */
    float own[384];
    const char *elsewhere = "Quantum gardening with a violin at midnight";
    CHECK(embedrag_embed(m, &elsewhere, NULL, 1, &ep, own) == 0, "embed");
    embedrag_document given = {.id = "given", .text = "a vector from elsewhere", .vector = own};
    CHECK(embedrag_store_add(st, &given, 1, NULL) == 0, "add a vector");
    CHECK(embedrag_store_search_vector(st, own, &sp, r, &found) == 0 && found > 0 &&
              !strcmp(r[0].document, "given") && r[0].score > 0.9999 &&
              !strcmp(r[0].text, "a vector from elsewhere"),
          "the given vector is found by itself");
    embedrag_store_close(st);

    /* Read-only without a model: by vector only; nothing can be added. */
    embedrag_store_params ro = embedrag_store_default_params();
    ro.read_only = true;
    st = NULL;
    CHECK(embedrag_store_open(path, NULL, &ro, &st) == 0, "read-only open: %s",
          embedrag_last_error());
    if (st) {
        CHECK(embedrag_store_get_info(st, &info) == 0 && info.search_copy_current,
              "closing the writer left the search copy current");
        CHECK(embedrag_store_search_vector(st, v, &sp, r, &found) == 0 && found == 10,
              "read-only search by vector");
        rc = embedrag_store_search(st, "a question", &sp, r, &found);
        CHECK(rc == EMBEDRAG_ERR_INVALID_ARGUMENT && strstr(embedrag_last_error(), "model"),
              "by text without a model: %d %s", rc, embedrag_last_error());
        CHECK(embedrag_store_add(st, &given, 1, NULL) == EMBEDRAG_ERR_INVALID_ARGUMENT,
              "a read-only store takes no documents");
        embedrag_store_close(st);
    }
    embedrag_model_close(m);
}

/* Clustered unit vectors: `centers` directions, each row one of them plus noise. */
static void clustered_rows(float *rows, size_t n, const float *centers, int center_count)
{
    for (size_t r = 0; r < n; r++) {
        const float *c = centers + (check_random() % (uint64_t)center_count) * 384;
        for (int d = 0; d < 384; d++) rows[r * 384 + d] = c[d] + 0.08f * check_uniform();
        check_normalize(rows + r * 384, 384);
    }
}

/* A store past SEARCH_QUANT_MIN_ROWS searches through quantized codes by default: recall@10
 * against the exact scan at least 0.99, every score the exact one, filters honoured, and the
 * codes cached for the next open. Vectors brought by the documents (no model work). */
#define QUANT_DOCS 60000
#define QUANT_QUERIES 40
static void test_quantized_store(void)
{
    embedrag_model *m = open_model("all-MiniLM-L6-v2");
    if (!m) return;
    char path[300], codes[330];
    snprintf(path, sizeof path, "%s/quant.db", dir);
    snprintf(codes, sizeof codes, "%s-codes", path);
    float *centers = malloc(200 * 384 * sizeof *centers);
    float *rows = malloc((size_t)QUANT_DOCS * 384 * sizeof *rows);
    float *queries = malloc(QUANT_QUERIES * 384 * sizeof *queries);
    embedrag_document *docs = calloc(QUANT_DOCS, sizeof *docs);
    char(*ids)[24] = malloc((size_t)QUANT_DOCS * sizeof *ids);
    static const char *const groups[] = {"{\"g\": 0}", "{\"g\": 1}", "{\"g\": 2}", "{\"g\": 3}"};
    embedrag_store *st = NULL;
    if (!centers || !rows || !queries || !docs || !ids) goto done;
    for (int c = 0; c < 200 * 384; c++) centers[c] = check_uniform();
    for (int c = 0; c < 200; c++) check_normalize(centers + c * 384, 384);
    clustered_rows(rows, QUANT_DOCS, centers, 200);
    clustered_rows(queries, QUANT_QUERIES, centers, 200);
    for (int i = 0; i < QUANT_DOCS; i++) {
        snprintf(ids[i], sizeof ids[i], "v%d", i);
        docs[i] = (embedrag_document){
            .id = ids[i], .text = ids[i], .metadata = groups[i % 4], .vector = rows + i * 384};
    }
    CHECK(embedrag_store_open(path, m, NULL, &st) == 0, "open: %s", embedrag_last_error());
    if (!st) goto done;
    CHECK(embedrag_store_add(st, docs, QUANT_DOCS, NULL) == 0, "add: %s", embedrag_last_error());
    static const char *const g[] = {"g"}, *const one[] = {"1"};
    for (int pass = 0; pass < 2; pass++) {
        /* Pass 1: a new handle, read-only and without a model, with the cached codes. */
        int found_hits = 0, total = 0, inexact = 0, outside = 0;
        for (int filtered = 0; filtered < 2; filtered++)
            for (int q = 0; q < QUANT_QUERIES; q++) {
                embedrag_search_params sp = embedrag_search_default_params();
                if (filtered) {
                    sp.metadata_keys = g;
                    sp.metadata_values = one;
                    sp.metadata_count = 1;
                }
                embedrag_search_result quick[10], exact[10];
                int nq = 0, ne = 0;
                bool ok = embedrag_store_search_vector(st, queries + q * 384, &sp, quick, &nq) == 0;
                char quick_ids[10][24];
                for (int i = 0; i < nq; i++) snprintf(quick_ids[i], 24, "%s", quick[i].document);
                double quick_scores[10];
                for (int i = 0; i < nq; i++) quick_scores[i] = quick[i].score;
                for (int i = 0; i < nq; i++) outside += filtered && !strstr(quick[i].metadata, "1");
                sp.exact = true;
                ok =
                    ok && embedrag_store_search_vector(st, queries + q * 384, &sp, exact, &ne) == 0;
                CHECK(ok && nq == 10 && ne == 10, "searches: %d %d %s", nq, ne,
                      embedrag_last_error());
                for (int i = 0; i < ne; i++) {
                    total++;
                    for (int j = 0; j < nq; j++)
                        if (!strcmp(exact[i].document, quick_ids[j])) {
                            found_hits++;
                            inexact += exact[i].score != quick_scores[j];
                        }
                }
            }
        double recall = total ? (double)found_hits / total : 0;
        CHECK(recall >= 0.99, "pass %d: recall@10 of the quantized search %.4f", pass, recall);
        CHECK(inexact == 0, "pass %d: %d scores differ from the exact scan's", pass, inexact);
        CHECK(outside == 0, "pass %d: %d results outside the filter", pass, outside);
        CHECK(access(codes, R_OK) == 0, "pass %d: the codes are cached in %s", pass, codes);
        embedrag_store_close(st);
        st = NULL;
        if (pass == 0) {
            embedrag_store_params ro = embedrag_store_default_params();
            ro.read_only = true;
            CHECK(embedrag_store_open(path, NULL, &ro, &st) == 0, "reopen: %s",
                  embedrag_last_error());
            if (!st) break;
        }
    }
done:
    embedrag_store_close(st);
    free(centers);
    free(rows);
    free(queries);
    free(docs);
    free(ids);
    embedrag_model_close(m);
}

/* ---- an indexer killed mid-run ---- */

#define KILLED_DOCUMENTS 3000
#define KILLED_EVERY_EMBEDDED 100 /* every 100th document is embedded by the model */

/* Document i of the killed runs: a sentence and, but for every 100th, its own vector (1 at
 * i % 384), so that most of the run is the pipeline's storing, text index and checkpoints. In
 * round r a seventh of them say so, so that each run replaces stored documents (whose old chunks
 * the text index must drop). */
static void write_killed_corpus(const char *path, int round)
{
    FILE *f = fopen(path, "wb");
    if (!f) return;
    for (int i = 0; i < KILLED_DOCUMENTS; i++) {
        fprintf(f, "{\"id\": \"k%d\", \"text\": \"%s", i, sentences[i % sentence_count]);
        if (i % 7 == round % 7) fprintf(f, " Round %d.", round);
        fputc('"', f);
        if (i % KILLED_EVERY_EMBEDDED) {
            fputs(", \"vector\": [", f);
            for (int d = 0; d < 384; d++)
                fputs(d == i % 384 ? (d ? ",1" : "1") : (d ? ",0" : "0"), f);
            fputc(']', f);
        }
        fputs("}\n", f);
    }
    fclose(f);
}

/* Indexes `jsonl` into `path` in a child process, killed with SIGKILL after `kill_ms` (never when
 * negative); returns its wait status. */
static int index_in_child(const char *path, const char *jsonl, int kill_ms)
{
    pid_t pid = fork();
    if (pid == 0) {
        embedrag_model_params p = embedrag_model_default_params();
        p.threads = 2;
        p.device = EMBEDRAG_DEVICE_CPU;
        embedrag_model *m = NULL;
        if (embedrag_model_open(model_dir, &p, &m) != 0) _exit(3);
        index_options o = {.store_path = path, .overlap_tokens = -1};
        index_summary sum;
        const char *paths[] = {jsonl};
        int rc = index_paths(m, paths, 1, &o, &sum);
        embedrag_model_close(m);
        _exit(rc == 0 && sum.failed == 0 ? 0 : 4);
    }
    if (kill_ms >= 0) {
        struct timespec t = {kill_ms / 1000, (long)(kill_ms % 1000) * 1000000L};
        nanosleep(&t, NULL);
        kill(pid, SIGKILL);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return status;
}

/* After a kill: every document stored is whole (one chunk with its own vector, or the model's
 * chunks), no chunk is without its document, and the text index, once a reader brought it up to
 * date, holds exactly the chunks. Returns the documents stored. `first`: a kill before the store
 * was made leaves none, which is 0 documents. */
static int check_killed_store(const char *path, const char *when, bool first)
{
    store *s = NULL;
    int rc = store_open(path, NULL, true, &s);
    if (rc == EMBEDRAG_ERR_NOT_FOUND && first) return 0;
    if (rc != 0) {
        CHECK(false, "%s: reopen: %s", when, err_get());
        return -1;
    }
    static int chunks[KILLED_DOCUMENTS];
    memset(chunks, 0, sizeof chunks);
    float *m = NULL;
    int64_t *ids = NULL;
    size_t n = 0;
    int wrong_vectors = 0, unknown = 0;
    CHECK(store_load_vectors(s, &m, &ids, &n, NULL) == 0, "%s: load: %s", when, err_get());
    for (size_t i = 0; i < n; i++) {
        store_chunk_info info;
        int d = -1;
        if (store_get_chunk(s, ids[i], &info) == 0 && info.document_key[0] == 'k')
            d = atoi(info.document_key + 1);
        if (d < 0 || d >= KILLED_DOCUMENTS) {
            unknown++;
            continue;
        }
        chunks[d]++;
        if (d % KILLED_EVERY_EMBEDDED && m[i * 384 + (size_t)(d % 384)] != 1.0f) wrong_vectors++;
    }
    int documents = 0, partial = 0;
    for (int d = 0; d < KILLED_DOCUMENTS; d++) {
        documents += chunks[d] > 0;
        partial += d % KILLED_EVERY_EMBEDDED && chunks[d] > 1;
    }
    store_stats st;
    store_get_stats(s, &st);
    CHECK(unknown == 0 && partial == 0 && wrong_vectors == 0 && st.documents == documents &&
              st.chunks == (int64_t)n,
          "%s: %d chunks of no document, %d documents with extra chunks, %d wrong vectors; %lld "
          "documents stored, %d with chunks",
          when, unknown, partial, wrong_vectors, (long long)st.documents, documents);
    free(m);
    free(ids);
    CHECK(store_index_text(s) == 0, "%s: update the text index: %s", when, err_get());
    store_close(s);
    CHECK(check_text_index_consistent(path), "%s: integrity of the store and its text index", when);
    return documents;
}

/* The whole indexer (its pipeline of threads, the text index's thread, the checkpoints) killed
 * with SIGKILL at random moments: after every kill the store is consistent and keeps what it had,
 * and a last run completes it, each document once. */
static void test_killed_indexer(void)
{
    char path[400], jsonl[400];
    snprintf(path, sizeof path, "%s/killed.db", dir);
    snprintf(jsonl, sizeof jsonl, "%s/killed.jsonl", dir);
    snprintf(model_dir, sizeof model_dir, "%s/models/all-MiniLM-L6-v2", check_source_dir());
    write_killed_corpus(jsonl, 0);
    /* How long a whole run takes here, in a scratch store: the kills land inside it. */
    char scratch[420];
    snprintf(scratch, sizeof scratch, "%s/scratch.db", dir);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int status = index_in_child(scratch, jsonl, -1);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "a whole run: status %d", status);
    int whole_ms = (int)((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000);
    if (whole_ms < 20) whole_ms = 20;
    srand(2026);
    int kills = 0, last = 0;
    for (int round = 0; round < 10; round++) {
        write_killed_corpus(jsonl, round);
        status = index_in_child(path, jsonl, rand() % whole_ms);
        kills += WIFSIGNALED(status);
        CHECK(WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) == 0),
              "round %d: the indexer failed (status %d)", round, status);
        char when[32];
        snprintf(when, sizeof when, "after kill %d", round);
        int documents = check_killed_store(path, when, last == 0);
        CHECK(documents >= last, "round %d: documents went from %d to %d", round, last, documents);
        last = documents;
    }
    status = index_in_child(path, jsonl, -1);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the completing run: status %d", status);
    CHECK(check_killed_store(path, "completed", false) == KILLED_DOCUMENTS,
          "every document after the kills");
    printf("killed the indexer %d times in runs of %d ms; the store stayed consistent\n", kills,
           whole_ms);
}

int main(void)
{
    if (load_sentences() != 0) {
        CHECK(false, "cannot read ../shared/data/stsb-en-dev.csv");
        return check_finish("test_index");
    }
    snprintf(dir, sizeof dir, "/tmp/test_index.XXXXXX");
    if (!mkdtemp(dir)) return check_finish("test_index");
    snprintf(store_file, sizeof store_file, "%s/store.db", dir);
    make_corpus();
    test_index_and_search();
    test_library_api();
    test_quantized_store();
    test_killed_indexer();
    char command[600];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    if (system(command) != 0) fprintf(stderr, "could not remove %s\n", dir);
    for (int i = 0; i < sentence_count; i++) free(sentences[i]);
    return check_finish("test_index");
}
