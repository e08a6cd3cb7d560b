/* The SQLite store (store.h). One file in WAL mode: readers never block the writer, a commit is
 * durable against a killed process (synchronous=NORMAL keeps the database consistent through a
 * power loss too, at the price of the last commits), and a second writing process is refused at
 * open with a clear error, through an flock on the database file that the kernel releases when
 * the holder dies however it dies. */
#include "store/store.h"

#include "store/bm25.h"

#include "util/error.h"
#include "util/memory.h"
#include "util/threadpool.h"

#include <sqlite3.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

/* The layout this code writes; a store with a larger number was made by a newer embedrag.
 * Format 2 added the meta key "generation", which every transaction that changes the chunks
 * bumps (once), so that the search copy of the vectors knows when it is stale. Format 3 deferred
 * the FTS5 text index to one statement per many chunks (a third of a row-by-row trigger's cost).
 * Format 4 moves the text index into a file of its own, "<store>-text" (see the text index
 * section below), so that it is built on its own connection while the one writer of the store
 * goes on storing: inside the store file, SQLite's single writer built it and stored the chunks
 * one after the other, and the two were most of indexing's time on a GPU. A writer upgrades
 * older stores in place; readers of formats 1-3 search their in-file index as it is. */
#define STORE_FORMAT 4

/* A writer brings the text index up to date after a commit that leaves this many chunks
 * waiting, so that a long run keeps BM25 close behind it for other processes (unless the
 * indexer's own thread does it: store_text_open). */
#define STORE_TEXT_INDEX_BATCH 65536

/* The page size of new stores (see store_open). */
#define STORE_PAGE_SIZE "16384"

/* How long a reader waits for a checkpoint or a writer's lock before it gives up. */
#define STORE_BUSY_MILLISECONDS 5000

enum {
    SQL_FIND_DOCUMENT,
    SQL_INSERT_DOCUMENT,
    SQL_UPDATE_DOCUMENT,
    SQL_DELETE_CHUNKS,
    SQL_INSERT_CHUNK,
    SQL_DELETE_DOCUMENT,
    SQL_GET_CHUNK,
    SQL_BUMP_GENERATION,
    SQL_CHUNK_IDS,
    SQL_CHUNK_HIGH,
    SQL_SET_CHUNK_HIGH,
    SQL_COUNT
};

static const char *const statements[SQL_COUNT] = {
    [SQL_FIND_DOCUMENT] = "SELECT id, content_hash FROM documents WHERE key = ?1",
    [SQL_INSERT_DOCUMENT] = "INSERT INTO documents (key, source, title, metadata, content_hash, "
                            "size, mtime) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    [SQL_UPDATE_DOCUMENT] = "UPDATE documents SET source = ?2, title = ?3, metadata = ?4, "
                            "content_hash = ?5, size = ?6, mtime = ?7 WHERE id = ?1",
    [SQL_DELETE_CHUNKS] = "DELETE FROM chunks WHERE document = ?1",
    [SQL_INSERT_CHUNK] = "INSERT INTO chunks (document, ordinal, start, end, tokens, text, vector, "
                         "id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    [SQL_DELETE_DOCUMENT] = "DELETE FROM documents WHERE id = ?1",
    [SQL_GET_CHUNK] = "SELECT d.key, d.source, d.title, d.metadata, c.text, c.start, c.end, "
                      "c.ordinal, c.tokens FROM chunks c JOIN documents d ON d.id = c.document "
                      "WHERE c.id = ?1",
    [SQL_BUMP_GENERATION] = "UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                            "WHERE key = 'generation'",
    [SQL_CHUNK_IDS] = "SELECT id FROM chunks WHERE document = ?1",
    [SQL_CHUNK_HIGH] = "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'chunk_high'",
    [SQL_SET_CHUNK_HIGH] = "UPDATE meta SET value = ?1 WHERE key = 'chunk_high'",
};

/* The schema of format 4. Chunks cascade with their document. Chunk ids only grow (the writer
 * gives each new chunk the meta key "chunk_high" plus one, and raises it), and a deleted chunk's
 * text goes to text_log, so that the text index in its own file can follow the store from two
 * numbers (see text_update). */
static const char schema[] =
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
    "CREATE TABLE documents (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, source TEXT,"
    " title TEXT, metadata TEXT, content_hash INTEGER NOT NULL, size INTEGER, mtime INTEGER);"
    "CREATE TABLE chunks (id INTEGER PRIMARY KEY, document INTEGER NOT NULL"
    " REFERENCES documents (id) ON DELETE CASCADE, ordinal INTEGER NOT NULL, start INTEGER"
    " NOT NULL, end INTEGER NOT NULL, tokens INTEGER NOT NULL, text TEXT NOT NULL,"
    " vector BLOB NOT NULL);"
    "CREATE INDEX chunks_by_document ON chunks (document);";

/* What format 4 adds to the tables of format 1, for a new store and to upgrade an older one (whose
 * in-file FTS5 index, triggers and queue go: the text file is built from the chunks). */
static const char schema_text_log[] =
    "DROP TRIGGER IF EXISTS chunks_indexed;"
    "DROP TRIGGER IF EXISTS chunks_unindexed;"
    "DROP TABLE IF EXISTS text_pending;"
    "DROP TABLE IF EXISTS chunk_text;"
    "CREATE TABLE IF NOT EXISTS text_log (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " id INTEGER NOT NULL, text TEXT NOT NULL);"
    "DROP TRIGGER IF EXISTS chunks_gone;"
    "CREATE TRIGGER chunks_gone AFTER DELETE ON chunks BEGIN"
    " INSERT INTO text_log (id, text) VALUES (old.id, old.text); END;"
    "INSERT OR REPLACE INTO meta (key, value) SELECT 'chunk_high', max(coalesce((SELECT max(id)"
    " FROM chunks), 0), coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key ="
    " 'chunk_high'), 0));"
    "INSERT OR REPLACE INTO meta (key, value) VALUES ('text_id', lower(hex(randomblob(8))));";

/* The text index's file: contentless FTS5 (the text is in the store) and where it stands. */
static const char schema_text_file[] =
    "CREATE TABLE IF NOT EXISTS text_meta (key TEXT PRIMARY KEY, value NOT NULL);"
    "CREATE VIRTUAL TABLE IF NOT EXISTS chunk_text USING fts5 (text, content = '');";

/* The identity fields, as meta keys. */
static const char *const identity_keys[] = {"model",     "dimension",    "pooling",  "prompt",
                                            "precision", "weights_hash", "directory"};
enum { ID_NAME, ID_DIMENSION, ID_POOLING, ID_PROMPT, ID_PRECISION, ID_WEIGHTS, ID_DIRECTORY, IDS };

/* A connection to the text index's file with the store attached as "store" (see text_update). */
struct store_text {
    sqlite3 *db;
    /* The store again, read-only: an update reads what it applies here, in short read
     * transactions of their own. Read through `db`, the store stayed in the text file's write
     * transaction for the whole update, and no checkpoint of the store's log could get past
     * that reader while it lasted (the indexer's text thread is busy most of a run). */
    sqlite3 *source;
    char *path;          /* "<store>-text", or "<store>-text.K" for shard K of several */
    int shard, shards;   /* it indexes the chunks whose id % shards is shard */
    bool writable;       /* false when the folder or the file refuses writes: searched as is */
    int64_t deletions;   /* text_log rows applied, as of the last update */
    int64_t behind;      /* deletions the index may not have applied yet (text_update) */
    store *elsewhere_of; /* the store whose commits leave updating to this handle's thread */
};

struct store {
    sqlite3 *db;
    char *path;
    int lock_fd; /* the database file, flocked while this handle may write; -1 when read-only */
    bool in_transaction;
    /* The chunks' changes since store_track_vectors, so that the next load makes the search
     * copy from the last one and these instead of reading every vector out of SQLite. */
    struct {
        bool on;
        uint64_t base_generation; /* the search copy they apply to */
        size_t base_count;
        size_t max_bytes;
        int64_t *ids; /* chunks added, with their vectors (dim floats each) */
        float *vectors;
        size_t count, committed, capacity;
        int64_t min_id; /* the least id added (INT64_MAX while none) */
        int64_t *gone;  /* ids of the copy's chunks deleted */
        size_t gone_count, gone_committed, gone_capacity;
    } track;
    char *row; /* store_get_chunk's copy of its row */
    size_t row_capacity;
    bool bumped; /* the open transaction has bumped the generation */
    bool doomed; /* a write of the open transaction failed: it can only be rolled back */
    sqlite3_stmt *sql[SQL_COUNT];
    int format;         /* as found at open (a writer upgrades to STORE_FORMAT) */
    int64_t next_chunk; /* the next chunk's id in the open transaction (0: not read yet) */
    bool high_dirty;    /* chunks were added: meta chunk_high is raised before COMMIT */
    /* The text index's connections, one per shard (format 4; opened when needed), and per
     * shard a word's chunk count and the unfiltered BM25 query, prepared at the first search. */
    store_text *text[STORE_TEXT_SHARDS_MAX];
    sqlite3_stmt *vocabulary[STORE_TEXT_SHARDS_MAX];
    sqlite3_stmt *bm25[STORE_TEXT_SHARDS_MAX];
    int text_shards;        /* meta text_shards (1 where absent) */
    int64_t counted_chunks; /* the chunk count at counted_generation */
    int64_t text_pending;   /* chunks this writer added since it last updated the text index */
    bool text_checked;      /* whether this writer updated the text index since it opened */
    int text_elsewhere;     /* shards a thread of the caller's updates (store_text_open) */
    uint64_t counted_generation;
    store_model model;
    char *identity[IDS]; /* owned strings behind model */
};

/* Maps a SQLite failure to a status with the file named and, for the common causes, what to
 * do. */
static int sql_error_at(const char *path, sqlite3 *db, int rc, const char *what)
{
    const char *detail = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    int system_error = db ? sqlite3_system_errno(db) : 0;
    /* A write refused for space comes as a full database or as an I/O error of the write,
     * whose errno SQLite does not always keep (a write cut short by a file size limit has
     * none). */
    int extended = db ? sqlite3_extended_errcode(db) : rc;
    if ((rc & 0xff) == SQLITE_IOERR &&
        (system_error == ENOSPC || system_error == EFBIG || system_error == EDQUOT ||
         (extended == SQLITE_IOERR_WRITE && system_error == 0)))
        rc = SQLITE_FULL;
    switch (rc & 0xff) {
    case SQLITE_FULL:
        return err_set(EMBEDRAG_ERR_IO,
                       "%s: %s: the disk is full or refused the write (nothing of this batch was "
                       "stored; free space and run again)",
                       path, what);
    case SQLITE_READONLY:
    case SQLITE_CANTOPEN:
    case SQLITE_PERM:
        return err_set(EMBEDRAG_ERR_IO, "%s: %s: %s (is the location writable?)", path, what,
                       detail);
    case SQLITE_NOTADB:
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s is not an embedrag store (not a SQLite database); choose another "
                       "file with --store",
                       path);
    case SQLITE_CORRUPT:
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: the database is corrupt (%s); restore it from a copy or index again "
                       "into a new store",
                       path, detail);
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        return err_set(EMBEDRAG_ERR_BUSY, "%s: %s: the store is busy (%s)", path, what, detail);
    case SQLITE_IOERR:
        return err_set(EMBEDRAG_ERR_IO, "%s: %s: input/output error (%s)", path, what, detail);
    }
    return err_set(EMBEDRAG_ERR_DATABASE, "%s: %s: %s", path, what, detail);
}

static int sql_error(const store *s, int rc, const char *what)
{
    return sql_error_at(s->path, s->db, rc, what);
}

static int exec(store *s, const char *sql, const char *what)
{
    int rc = sqlite3_exec(s->db, sql, NULL, NULL, NULL);
    return rc == SQLITE_OK ? 0 : sql_error(s, rc, what);
}

/* "<store>-NAME" and EXTRA after it ("-text", "-wal", "-text-wal"), malloc'd; NULL when out of
 * memory. */
static char *side_path(const char *store_path, const char *name, const char *extra)
{
    char suffix[96];
    snprintf(suffix, sizeof suffix, "-%s%s", name, extra ? extra : "");
    size_t n = strlen(store_path), a = strlen(suffix);
    char *p = malloc(n + a + 1);
    if (!p) return NULL;
    memcpy(p, store_path, n);
    memcpy(p + n, suffix, a + 1);
    return p;
}

static char *copy_string(const char *text)
{
    return strdup(text ? text : "");
}

/* Reads meta key `key` into a new string (NULL when absent or on failure, with *rc set). */
static char *read_meta(store *s, const char *key, int *rc)
{
    sqlite3_stmt *st = NULL;
    char *value = NULL;
    *rc = sqlite3_prepare_v2(s->db, "SELECT value FROM meta WHERE key = ?1", -1, &st, NULL);
    if (*rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
        int step = sqlite3_step(st);
        if (step == SQLITE_ROW)
            value = copy_string((const char *)sqlite3_column_text(st, 0));
        else if (step != SQLITE_DONE)
            *rc = step;
    }
    sqlite3_finalize(st);
    if (*rc == SQLITE_OK) *rc = 0;
    return value;
}

/* The shards a new text index is split into: EMBEDRAG_TEXT_SHARDS where set (1 to
 * STORE_TEXT_SHARDS_MAX), else store_text_shards_for(online cores). */
static int default_text_shards(void)
{
    const char *env = getenv("EMBEDRAG_TEXT_SHARDS");
    if (!env || !*env) return store_text_shards_for(threadpool_online_cores());
    int n = atoi(env);
    return n < 1 ? 1 : n > STORE_TEXT_SHARDS_MAX ? STORE_TEXT_SHARDS_MAX : n;
}

/* The indexer updates each shard on a thread of its own. On the 16-core GPU host one FTS5 index
 * was indexing's slowest stage (4.5 s of a 5.1 s run for 244,800 chunks, nearly all of it FTS5's
 * own work per token); three files took 5-7 points of raw embedding speed back in each of three
 * rounds (2026-11-30, BENCHMARKS.md), and the store thread is the slowest stage again. On a few
 * cores the embedding is the bound and one file does; a BM25 search over three files measured no
 * slower on 2 cores. So: a file per five cores, one to three. */
int store_text_shards_for(int cores)
{
    int n = cores / 5;
    return n < 1 ? 1 : n > 3 ? 3 : n;
}

static int write_meta(store *s, const char *key, const char *value)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(s->db, "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                                -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, value, -1, SQLITE_STATIC);
        rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(s->db);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : sql_error(s, rc, "writing the store's settings");
}

static void set_identity(store *s, int field, char *value)
{
    free(s->identity[field]);
    s->identity[field] = value;
}

static void expose_identity(store *s)
{
    s->model.name = s->identity[ID_NAME];
    s->model.dimension = s->identity[ID_DIMENSION] ? atoi(s->identity[ID_DIMENSION]) : 0;
    s->model.pooling = s->identity[ID_POOLING];
    s->model.prompt = s->identity[ID_PROMPT];
    s->model.precision = s->identity[ID_PRECISION];
    s->model.weights_hash = s->identity[ID_WEIGHTS];
    s->model.directory = s->identity[ID_DIRECTORY];
}

/* The model's identity fields as strings, in identity_keys' order. */
static void identity_of(const store_model *m, char dimension[16], const char *out[IDS])
{
    snprintf(dimension, 16, "%d", m->dimension);
    out[ID_NAME] = m->name;
    out[ID_DIMENSION] = dimension;
    out[ID_POOLING] = m->pooling;
    out[ID_PROMPT] = m->prompt;
    out[ID_PRECISION] = m->precision;
    out[ID_WEIGHTS] = m->weights_hash;
    out[ID_DIRECTORY] = m->directory;
}

/* Creates the schema and records the model, or checks a store's format and model. */
static int prepare_contents(store *s, const store_model *model)
{
    int rc = 0;
    sqlite3_stmt *st = NULL;
    /* The first read of the file: a file that is not a database fails here. */
    int sq = sqlite3_prepare_v2(s->db, "SELECT count(*) FROM sqlite_master WHERE name = 'meta'", -1,
                                &st, NULL);
    if (sq == SQLITE_OK) sq = sqlite3_step(st);
    bool has_meta = sq == SQLITE_ROW && sqlite3_column_int(st, 0) > 0;
    int tables = 0;
    sqlite3_finalize(st);
    if (sq != SQLITE_ROW) return sql_error(s, sq, "reading the store");
    if (!has_meta) {
        sq = sqlite3_prepare_v2(s->db, "SELECT count(*) FROM sqlite_master", -1, &st, NULL);
        if (sq == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW) tables = sqlite3_column_int(st, 0);
        sqlite3_finalize(st);
        if (tables > 0)
            return err_set(EMBEDRAG_ERR_FORMAT,
                           "%s is a SQLite database but not an embedrag store; choose another "
                           "file with --store",
                           s->path);
        if (s->lock_fd < 0)
            return err_set(EMBEDRAG_ERR_NOT_FOUND,
                           "%s is empty: no documents were indexed into "
                           "it (run embedrag index)",
                           s->path);
        char dimension[16];
        const char *fields[IDS];
        identity_of(model, dimension, fields);
        char format[16], shards[16];
        snprintf(format, sizeof format, "%d", STORE_FORMAT);
        snprintf(shards, sizeof shards, "%d", default_text_shards());
        rc = exec(s, "BEGIN IMMEDIATE", "creating the store");
        if (!rc) rc = exec(s, schema, "creating the store");
        if (!rc) rc = exec(s, schema_text_log, "creating the store");
        if (!rc) rc = write_meta(s, "format", format);
        if (!rc) rc = write_meta(s, "text_shards", shards);
        if (!rc) rc = write_meta(s, "generation", "1");
        for (int i = 0; i < IDS && !rc; i++) rc = write_meta(s, identity_keys[i], fields[i]);
        if (!rc) rc = exec(s, "COMMIT", "creating the store");
        if (rc) {
            sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
            return rc;
        }
    }
    char *format = read_meta(s, "format", &rc);
    if (rc) {
        free(format);
        return sql_error(s, rc, "reading the store's format");
    }
    int version = format ? atoi(format) : 0;
    free(format);
    if (version < 1 || version > STORE_FORMAT)
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s has store format %d; this embedrag reads format %d (a newer embedrag "
                       "made it?)",
                       s->path, version, STORE_FORMAT);
    if (version < STORE_FORMAT && s->lock_fd >= 0) {
        char latest[16], shards[16];
        snprintf(latest, sizeof latest, "%d", STORE_FORMAT);
        snprintf(shards, sizeof shards, "%d", default_text_shards());
        rc = exec(s, "BEGIN IMMEDIATE", "upgrading the store");
        if (!rc && version < 2) rc = write_meta(s, "generation", "1");
        if (!rc) rc = exec(s, schema_text_log, "upgrading the store");
        /* Its text index is built afresh in files of the new format: split as a new store's. */
        if (!rc) rc = write_meta(s, "text_shards", shards);
        if (!rc) rc = write_meta(s, "format", latest);
        if (!rc) rc = exec(s, "COMMIT", "upgrading the store");
        if (rc) {
            sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
            return rc;
        }
        version = STORE_FORMAT;
    }
    s->format = version;
    /* A store of format 4 from before text indexes were split has no key: one file. */
    char *shards = read_meta(s, "text_shards", &rc);
    s->text_shards = shards ? atoi(shards) : 1;
    free(shards);
    if (rc) return sql_error(s, rc, "reading the store's settings");
    if (s->text_shards < 1 || s->text_shards > STORE_TEXT_SHARDS_MAX)
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s splits its text index into %d files; this embedrag reads 1 to %d (a "
                       "newer embedrag made it?)",
                       s->path, s->text_shards, STORE_TEXT_SHARDS_MAX);
    for (int i = 0; i < IDS; i++) {
        char *value = read_meta(s, identity_keys[i], &rc);
        if (rc) {
            free(value);
            return sql_error(s, rc, "reading the model's identity");
        }
        set_identity(s, i, value ? value : copy_string(""));
    }
    expose_identity(s);
    if (s->lock_fd < 0 || !model) return 0;
    char dimension[16];
    const char *fields[IDS];
    identity_of(model, dimension, fields);
    /* Precision and directory may change between runs (vectors of fp32 and bf16 agree to
     * cosine 0.9999); what made different vectors may not. */
    for (int i = 0; i < IDS; i++) {
        if (i == ID_PRECISION || i == ID_DIRECTORY) continue;
        if (strcmp(s->identity[i], fields[i] ? fields[i] : "") != 0)
            return err_set(EMBEDRAG_ERR_MODEL_MISMATCH,
                           "%s was built with model %s (%s %s); this run uses %s (%s %s): index "
                           "into a new store, or use the store's model",
                           s->path, s->identity[ID_NAME], identity_keys[i], s->identity[i],
                           fields[ID_NAME], identity_keys[i], fields[i] ? fields[i] : "");
    }
    rc = write_meta(s, "directory", model->directory ? model->directory : "");
    if (!rc) rc = write_meta(s, "precision", model->precision ? model->precision : "");
    if (!rc) {
        set_identity(s, ID_DIRECTORY, copy_string(model->directory));
        set_identity(s, ID_PRECISION, copy_string(model->precision));
        expose_identity(s);
    }
    return rc;
}

int store_open(const char *path, const store_model *model, bool read_only, store **out)
{
    if (!out) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "store_open: out is NULL");
    *out = NULL;
    if (!path || (!read_only && (!model || !model->name || model->dimension < 1)))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "store_open: a path and, to write, a model");
    store *s = calloc(1, sizeof *s);
    if (!s) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory opening %s", path);
    s->lock_fd = -1;
    s->path = strdup(path);
    int rc = 0;
    if (!s->path) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory opening %s", path);
        goto fail;
    }
    struct stat st;
    if (read_only && stat(path, &st) != 0) {
        rc = err_set(EMBEDRAG_ERR_NOT_FOUND, "%s: no such store (run embedrag index first)", path);
        goto fail;
    }
    if (!read_only) {
        /* One writer: the lock is on our own descriptor of the file, which stays open until
         * after SQLite closes it (closing another descriptor would drop SQLite's locks). */
        s->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (s->lock_fd < 0) {
            rc = err_set(EMBEDRAG_ERR_IO,
                         "%s: cannot open for writing: %s (is the location "
                         "writable?)",
                         path, strerror(errno));
            goto fail;
        }
        if (flock(s->lock_fd, LOCK_EX | LOCK_NB) != 0) {
            rc = err_set(EMBEDRAG_ERR_BUSY,
                         "%s is being written by another process (an embedrag index still "
                         "running?); wait for it, or use another --store",
                         path);
            goto fail;
        }
    }
    int flags = (read_only ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) |
                SQLITE_OPEN_NOMUTEX;
    int sq = sqlite3_open_v2(path, &s->db, flags, NULL);
    if (sq != SQLITE_OK) {
        rc = sql_error(s, sq, "opening");
        goto fail;
    }
    sqlite3_extended_result_codes(s->db, 1);
    sqlite3_busy_timeout(s->db, STORE_BUSY_MILLISECONDS);
    if (!read_only) {
        /* A new store's pages hold several chunks each (a 384-float vector and its text take
         * ~2.3 KB, one to a 4 KB page): a third smaller and faster to write than with 4 KB
         * pages. Set before the first write; a no-op on an existing store. */
        rc = exec(s, "PRAGMA page_size = " STORE_PAGE_SIZE, "opening");
        if (!rc) rc = exec(s, "PRAGMA journal_mode = WAL", "opening");
        if (!rc) rc = exec(s, "PRAGMA synchronous = NORMAL", "opening");
    }
    if (!rc) rc = exec(s, "PRAGMA foreign_keys = ON", "opening");
    if (!rc) rc = prepare_contents(s, model);
    for (int i = 0; i < SQL_COUNT && !rc; i++) {
        sq = sqlite3_prepare_v3(s->db, statements[i], -1, SQLITE_PREPARE_PERSISTENT, &s->sql[i],
                                NULL);
        if (sq != SQLITE_OK) rc = sql_error(s, sq, "preparing statements");
    }
    if (rc) goto fail;
    *out = s;
    return 0;
fail:
    store_close(s);
    return rc;
}

/* ---- the chunks' changes, for the next search copy ---- */

static void track_drop(store *s)
{
    free(s->track.ids);
    free(s->track.vectors);
    free(s->track.gone);
    memset(&s->track, 0, sizeof s->track);
}

/* The search copy of (generation, count) is the base from now on; nothing changed since. */
static void track_rebase(store *s, uint64_t generation, size_t count)
{
    s->track.base_generation = generation;
    s->track.base_count = count;
    s->track.count = s->track.committed = 0;
    s->track.gone_count = s->track.gone_committed = 0;
    s->track.min_id = INT64_MAX;
}

static void track_commit(store *s)
{
    s->track.committed = s->track.count;
    s->track.gone_committed = s->track.gone_count;
}

static void track_rollback(store *s)
{
    s->track.count = s->track.committed;
    s->track.gone_count = s->track.gone_committed;
}

static void text_close(store_text *t)
{
    if (!t) return;
    if (t->db) sqlite3_close(t->db);
    if (t->source) sqlite3_close(t->source);
    free(t->path);
    free(t);
}

void store_close(store *s)
{
    if (!s) return;
    if (s->in_transaction) sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
    /* What this writer changed reaches the text index before it goes (a reader would bring it
     * up to date at its next search anyway, where it may write the text file). */
    else if (s->text_pending && s->db)
        store_index_text(s);
    track_drop(s);
    free(s->row);
    for (int i = 0; i < SQL_COUNT; i++) sqlite3_finalize(s->sql[i]);
    for (int k = 0; k < STORE_TEXT_SHARDS_MAX; k++) {
        sqlite3_finalize(s->vocabulary[k]);
        sqlite3_finalize(s->bm25[k]);
        text_close(s->text[k]);
    }
    if (s->db) sqlite3_close(s->db);
    if (s->lock_fd >= 0) close(s->lock_fd); /* releases the writer's flock */
    for (int i = 0; i < IDS; i++) free(s->identity[i]);
    free(s->path);
    free(s);
}

const store_model *store_get_model(const store *s)
{
    return &s->model;
}

/* ---- the text index ----
 *
 * BM25 runs on an FTS5 index in "<store>-text", a SQLite file of its own: contentless (the text
 * stays in the store), with its own write lock, so that one connection builds it while the
 * store's writer goes on storing. It follows the store through two numbers it keeps with its
 * rows, in one transaction: "chunks", the highest chunk id it has taken (every chunk up to it
 * that existed then is indexed), and "deletions", the last text_log row it has applied (each
 * deleted chunk's id and text, logged by a trigger in the store's own transaction). One update
 * reads one snapshot of the store (text_update): it unindexes the chunks logged since whose ids
 * it had taken, indexes the chunks past its "chunks" mark, and moves both marks. Chunk ids only
 * grow, so a chunk added and deleted between two updates is neither indexed nor unindexed, and
 * no id comes back. Whatever kills a process, the file holds the marks of the rows it holds, and
 * the next update (by any writer or reader that may write the file) goes on from there. A text
 * file of another store (its "store" value is not the store's meta text_id), a missing one, or a
 * damaged one (a writer removes it) is built again from the chunks, and so is one restored from
 * an older copy (text_state). Readers search the file as it is when another connection is
 * updating it: a chunk deleted meanwhile is left out by a check against the store's chunks, a
 * chunk added shows up at the next update. */

static int text_sql_error(const store_text *t, int rc, const char *what)
{
    if ((rc & 0xff) == SQLITE_NOTADB || (rc & 0xff) == SQLITE_CORRUPT)
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: the text index is damaged (%s); run embedrag index on the store to "
                       "build it again",
                       t->path, t->db ? sqlite3_errmsg(t->db) : sqlite3_errstr(rc));
    return sql_error_at(t->path, t->db, rc, what);
}

static int text_exec(store_text *t, const char *sql, const char *what)
{
    int rc = sqlite3_exec(t->db, sql, NULL, NULL, NULL);
    return rc == SQLITE_OK ? 0 : text_sql_error(t, rc, what);
}

/* Opens the text file (creating it where the folder allows), readies its tables where it may
 * write, and attaches the store as "store". */
static int text_setup(store_text *t, const char *store_path)
{
    int sq = sqlite3_open_v2(
        t->path, &t->db,
        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_URI, NULL);
    if (sq == SQLITE_CANTOPEN || sq == SQLITE_READONLY || sq == SQLITE_PERM) {
        /* A read-only folder: an existing file is searched as it is. */
        sqlite3_close(t->db);
        t->db = NULL;
        sq = sqlite3_open_v2(t->path, &t->db,
                             SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_URI, NULL);
        if (sq != SQLITE_OK) {
            int rc = err_set(EMBEDRAG_ERR_IO,
                             "%s: the store has no text index and this folder cannot hold one "
                             "(%s); run embedrag index on the store where it may write",
                             t->path, sqlite3_errstr(sq));
            return rc;
        }
    } else if (sq != SQLITE_OK) {
        return text_sql_error(t, sq, "opening the text index");
    }
    sqlite3_extended_result_codes(t->db, 1);
    sqlite3_busy_timeout(t->db, STORE_BUSY_MILLISECONDS);
    t->writable = !sqlite3_db_readonly(t->db, "main");
    int rc = 0;
    if (t->writable) {
        /* FTS5's doclists are blobs of many kilobytes: on pages as large as the store's, a
         * query reads fewer of them (set before the first write; a no-op after). */
        rc = text_exec(t, "PRAGMA page_size = " STORE_PAGE_SIZE, "opening the text index");
        if (!rc) rc = text_exec(t, "PRAGMA journal_mode = WAL", "opening the text index");
        if (!rc) rc = text_exec(t, "PRAGMA synchronous = NORMAL", "opening the text index");
        if (!rc) rc = text_exec(t, schema_text_file, "creating the text index");
    } else {
        /* The first read tells a damaged file. */
        rc = text_exec(t, "SELECT count(*) FROM sqlite_master", "opening the text index");
    }
    sqlite3_stmt *st = NULL;
    if (!rc) {
        /* Read-only: BEGIN IMMEDIATE takes the write lock of every attached database that may
         * be written, and the store's writer would then wait for each update (measured: the
         * store thread slept in its BEGIN IMMEDIATE for most of its time). */
        char *uri = malloc(3 * strlen(store_path) + 16);
        if (!uri) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory opening %s", t->path);
        char *w = uri + sprintf(uri, "file:");
        for (const char *c = store_path; *c; c++)
            w += *c == '%' || *c == '?' || *c == '#' ? sprintf(w, "%%%02X", (unsigned char)*c)
                                                     : sprintf(w, "%c", *c);
        strcpy(w, "?mode=ro");
        sq = sqlite3_prepare_v2(t->db, "ATTACH ?1 AS store", -1, &st, NULL);
        if (sq == SQLITE_OK) {
            sqlite3_bind_text(st, 1, uri, -1, SQLITE_STATIC);
            sq = sqlite3_step(st);
        }
        sqlite3_finalize(st);
        if (sq == SQLITE_DONE)
            sq =
                sqlite3_open_v2(uri, &t->source,
                                SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_URI, NULL);
        free(uri);
        if (sq != SQLITE_OK) rc = text_sql_error(t, sq, "opening the store for its text index");
        if (!rc) {
            sqlite3_extended_result_codes(t->source, 1);
            sqlite3_busy_timeout(t->source, STORE_BUSY_MILLISECONDS);
        }
    }
    if (!rc && t->shards > 1 && bm25_register(t->db) != SQLITE_OK)
        rc = text_sql_error(t, SQLITE_ERROR, "readying BM25 over the text index's shards");
    return rc;
}

/* The side name of shard `shard` of a text index split into `shards` files: "text" where it is
 * one, else "text.K" for K = 0 .. shards - 1 (so that an embedrag from before shards finds no
 * "-text" file and builds one of its own, never taking a shard for the whole index). */
static void text_name(int shard, int shards, char name[32])
{
    if (shards > 1)
        snprintf(name, 32, "text.%d", shard);
    else
        snprintf(name, 32, "text");
}

/* A connection to shard `shard` of the text index of the store at store_path, split into
 * `shards` files. A writer (`repair`) removes a damaged file and starts a new one. */
static int text_connect(const char *store_path, int shard, int shards, bool repair,
                        store_text **out)
{
    *out = NULL;
    char name[32];
    text_name(shard, shards, name);
    store_text *t = calloc(1, sizeof *t);
    if (!t || !(t->path = side_path(store_path, name, NULL))) {
        free(t);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory opening %s's text index", store_path);
    }
    t->shard = shard;
    t->shards = shards;
    int rc = text_setup(t, store_path);
    if (rc == EMBEDRAG_ERR_FORMAT && repair) {
        /* Derived data only: a writer builds it again from the chunks. */
        sqlite3_close(t->db);
        t->db = NULL;
        unlink(t->path);
        for (int i = 0; i < 2; i++) {
            char *side = side_path(store_path, name, i ? "-shm" : "-wal");
            if (side) unlink(side);
            free(side);
        }
        err_clear();
        rc = text_setup(t, store_path);
    }
    if (rc) {
        text_close(t);
        return rc;
    }
    *out = t;
    return 0;
}

/* Whether a text index (of this store: `ours`, its "store" is the store's text_id) with marks
 * `chunks` and `deletions` can follow a store whose chunk_high is `high`, whose last text_log row
 * ever written is `last` and whose first row still there is `first`: its marks are not ahead of
 * the store (a store restored from an older copy) nor behind log rows that were cleared (a text
 * file restored from an older copy). */
static bool text_follows(bool ours, int64_t chunks, int64_t deletions, int64_t high, int64_t last,
                         int64_t first)
{
    return ours && chunks <= high && deletions <= last && deletions >= first - 1;
}

/* What a text file keeps as its "store": the store's text_id, and for a shard of several
 * "/K/N" after it (a shard file of another split is built again, as one of another store). */
static void text_suffix(const store_text *t, char suffix[32])
{
    if (t->shards > 1)
        snprintf(suffix, 32, "/%d/%d", t->shard, t->shards);
    else
        suffix[0] = '\0';
}

/* Where the text index stands against one snapshot of the store (read in one statement): v[0]
 * its "chunks" mark, v[1] its "deletions" mark, v[2] the store's chunk_high, v[3] the last
 * text_log row ever written (sqlite_sequence keeps it when the log is cleared); *same whether it
 * can follow the store (text_follows). */
static int text_state(store_text *t, int64_t v[4], bool *same)
{
    sqlite3_stmt *st = NULL;
    char suffix[32];
    text_suffix(t, suffix);
    int sq = sqlite3_prepare_v2(
        t->db,
        "SELECT coalesce((SELECT value FROM text_meta WHERE key = 'chunks'), 0),"
        " coalesce((SELECT value FROM text_meta WHERE key = 'deletions'), 0),"
        " CAST(coalesce((SELECT value FROM store.meta WHERE key = 'chunk_high'), 0) AS INTEGER),"
        " coalesce((SELECT seq FROM store.sqlite_sequence WHERE name = 'text_log'), 0),"
        " (SELECT value FROM text_meta WHERE key = 'store') IS"
        " (SELECT value || ?1 FROM store.meta WHERE key = 'text_id'),"
        " (SELECT min(seq) FROM store.text_log)",
        -1, &st, NULL);
    if (sq == SQLITE_OK) sqlite3_bind_text(st, 1, suffix, -1, SQLITE_STATIC);
    if (sq == SQLITE_OK && (sq = sqlite3_step(st)) == SQLITE_ROW) {
        for (int i = 0; i < 4; i++) v[i] = sqlite3_column_int64(st, i);
        int64_t first =
            sqlite3_column_type(st, 5) == SQLITE_NULL ? v[3] + 1 : sqlite3_column_int64(st, 5);
        *same = text_follows(sqlite3_column_int(st, 4) != 0, v[0], v[1], v[2], v[3], first);
    }
    sqlite3_finalize(st);
    return sq == SQLITE_ROW ? 0 : text_sql_error(t, sq, "reading the text index's state");
}

/* What one step of an update reads from the store: rows (a chunk's id and text, or a log row's
 * deleted chunk id and text), their text end to end. */
typedef struct text_rows {
    int64_t *ids;
    size_t *ends; /* row i's text is text[ends[i - 1] (0 for the first) .. ends[i]) */
    char *text;
    size_t count, capacity, bytes, bytes_capacity;
} text_rows;

static int text_rows_add(text_rows *r, int64_t id, const char *text, size_t length)
{
    if (r->count == r->capacity) {
        size_t grown = r->capacity ? 2 * r->capacity : 1024;
        int64_t *ids = realloc(r->ids, grown * sizeof *ids);
        if (ids) r->ids = ids;
        size_t *ends = realloc(r->ends, grown * sizeof *ends);
        if (ends) r->ends = ends;
        if (!ids || !ends) return -1;
        r->capacity = grown;
    }
    if (!r->text || r->bytes + length > r->bytes_capacity) {
        size_t grown = r->bytes_capacity ? r->bytes_capacity : 1 << 20;
        while (grown < r->bytes + length) grown *= 2;
        char *text_grown = realloc(r->text, grown);
        if (!text_grown) return -1;
        r->text = text_grown;
        r->bytes_capacity = grown;
    }
    if (length) memcpy(r->text + r->bytes, text, length);
    r->bytes += length;
    r->ids[r->count] = id;
    r->ends[r->count++] = r->bytes;
    return 0;
}

/* Rows one step reads at most (their text stays in memory until applied). */
#define TEXT_STEP_ROWS 16384

/* The store's side of one step (this shard's rows), in one read transaction of t->source: st[0] its
 * chunk_high, st[1] the last text_log row ever written (sqlite_sequence keeps it when the log is
 * cleared), st[2] the first log row still there (st[1] + 1 when none), *text_id its text_id
 * (malloc'd); then, where the log has rows past `deletions`, the next of them in order (rows->ids:
 * the chunk each deleted; *next: the log row the step ends at), else the next chunks past `chunks`
 * up to `high_limit` (*next: the chunk id it ends at). */
static int text_read(store_text *t, int64_t chunks, int64_t deletions, int64_t high_limit,
                     int64_t st[3], char **text_id, text_rows *rows, int64_t *next)
{
    *text_id = NULL;
    st[0] = st[1] = 0;
    st[2] = 1;
    rows->count = rows->bytes = 0;
    sqlite3 *db = t->source;
    int sq = sqlite3_exec(db, "BEGIN", NULL, NULL, NULL);
    sqlite3_stmt *q = NULL;
    if (sq == SQLITE_OK)
        sq = sqlite3_prepare_v2(
            db,
            "SELECT CAST(coalesce((SELECT value FROM meta WHERE key = 'chunk_high'), 0) AS "
            "INTEGER), coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'text_log'), 0),"
            " (SELECT min(seq) FROM text_log), (SELECT value FROM meta WHERE key = 'text_id')",
            -1, &q, NULL);
    if (sq == SQLITE_OK && (sq = sqlite3_step(q)) == SQLITE_ROW) {
        st[0] = sqlite3_column_int64(q, 0);
        st[1] = sqlite3_column_int64(q, 1);
        st[2] = sqlite3_column_type(q, 2) == SQLITE_NULL ? st[1] + 1 : sqlite3_column_int64(q, 2);
        const char *id = (const char *)sqlite3_column_text(q, 3);
        char suffix[32];
        text_suffix(t, suffix);
        *text_id = malloc(strlen(id ? id : "") + strlen(suffix) + 1);
        if (*text_id) sprintf(*text_id, "%s%s", id ? id : "", suffix);
        sq = *text_id ? SQLITE_OK : SQLITE_NOMEM;
    }
    sqlite3_finalize(q);
    q = NULL;
    bool log = st[1] > deletions;
    *next = log ? deletions : chunks;
    if (sq == SQLITE_OK && (log || high_limit > chunks)) {
        sq = sqlite3_prepare_v2(db,
                                log ? "SELECT seq, id, text FROM text_log WHERE seq > ?1 AND id % "
                                      "?4 = ?5 ORDER BY seq LIMIT ?2"
                                    : "SELECT id, id, text FROM chunks WHERE id > ?1 AND id <= "
                                      "?3 AND id % ?4 = ?5 ORDER BY id LIMIT ?2",
                                -1, &q, NULL);
        if (sq == SQLITE_OK) {
            sqlite3_bind_int64(q, 1, log ? deletions : chunks);
            sqlite3_bind_int(q, 2, TEXT_STEP_ROWS);
            sqlite3_bind_int(q, 4, t->shards); /* this shard's chunks only */
            sqlite3_bind_int(q, 5, t->shard);
            if (!log) sqlite3_bind_int64(q, 3, high_limit);
            while ((sq = sqlite3_step(q)) == SQLITE_ROW) {
                *next = sqlite3_column_int64(q, 0);
                if (text_rows_add(rows, sqlite3_column_int64(q, 1),
                                  (const char *)sqlite3_column_text(q, 2),
                                  (size_t)sqlite3_column_bytes(q, 2)) != 0) {
                    sq = SQLITE_NOMEM;
                    break;
                }
            }
            if (sq == SQLITE_DONE) {
                sq = SQLITE_OK;
                /* Fewer rows than asked for: the step reaches the end of its snapshot, whose
                 * chunks go no further than its chunk_high (an update's first step reads before
                 * it knows its target, with no limit: taking that limit as the mark made the
                 * next update find a mark past the store's and build the index again). */
                if (rows->count < TEXT_STEP_ROWS)
                    *next = log ? st[1] : high_limit < st[0] ? high_limit : st[0];
            }
        }
        sqlite3_finalize(q);
    }
    sqlite3_exec(db, "COMMIT", NULL, NULL, NULL); /* a read: nothing to keep or lose */
    if (sq != SQLITE_OK) {
        free(*text_id);
        *text_id = NULL;
        return sq == SQLITE_NOMEM
                   ? err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory updating %s", t->path)
                   : sql_error_at(t->path, db, sq, "reading the store's chunks");
    }
    return 0;
}

/* Applies the rows one step read: each a chunk to index, or (`unindex`) a deleted chunk to take
 * out, of those the index has taken (ids up to `chunks`). */
static int text_apply(store_text *t, const text_rows *rows, bool unindex, int64_t chunks)
{
    sqlite3_stmt *st = NULL;
    int sq = sqlite3_prepare_v2(t->db,
                                unindex ? "INSERT INTO chunk_text (chunk_text, rowid, text) "
                                          "VALUES ('delete', ?1, ?2)"
                                        : "INSERT INTO chunk_text (rowid, text) VALUES (?1, ?2)",
                                -1, &st, NULL);
    for (size_t i = 0; sq == SQLITE_OK && i < rows->count; i++) {
        if (unindex && rows->ids[i] > chunks) continue; /* never taken */
        size_t start = i ? rows->ends[i - 1] : 0;
        sqlite3_bind_int64(st, 1, rows->ids[i]);
        sqlite3_bind_text(st, 2, rows->text + start, (int)(rows->ends[i] - start), SQLITE_STATIC);
        sq = sqlite3_step(st);
        sqlite3_reset(st);
        if (sq == SQLITE_DONE) sq = SQLITE_OK;
    }
    sqlite3_finalize(st);
    return sq == SQLITE_OK ? 0 : text_sql_error(t, sq, "updating the text index");
}

/* Brings the text index up to date with the store: with the text file's write lock held, in
 * steps, each of which reads one snapshot of the store (text_read) and applies it. A step
 * unindexes the logged deletions of chunks the index had taken, or, once it has applied the whole
 * log of its snapshot, indexes the next chunks; either way the index's marks describe exactly
 * what it holds after each step (a chunk deleted before a step indexes its range is neither
 * indexed nor, later, unindexed). `wait`: wait for another connection that is updating it (else,
 * where it is this store's index, return at once and leave it as it is: t->behind then bounds how
 * many chunks it may still hold that are gone). */
static int text_update(store_text *t, bool wait)
{
    int64_t v[4];
    bool same = false;
    int rc = 0;
    if (!wait || !t->writable) {
        /* A reader looks first without the write lock: mostly there is nothing to do. */
        rc = text_state(t, v, &same);
        if (rc) return rc;
        t->behind = same && v[3] > v[1] ? v[3] - v[1] : 0;
        if (same && v[0] == v[2] && v[1] == v[3]) return 0;
        if (!t->writable)
            return same ? 0
                        : err_set(EMBEDRAG_ERR_FORMAT,
                                  "%s is the text index of another store, and this folder cannot "
                                  "hold a new one; run embedrag index on the store where it may "
                                  "write",
                                  t->path);
        if (!same) wait = true; /* nothing of this store's to search meanwhile */
    }
    /* The text file's write lock, taken by a first statement that writes nothing: BEGIN
     * IMMEDIATE would also open a read transaction on the attached store, which would then pin
     * the store's write-ahead log for the whole update (no checkpoint gets past a reader). */
    if (!wait) sqlite3_busy_timeout(t->db, 0);
    int sq = sqlite3_exec(t->db, "BEGIN; DELETE FROM main.text_meta WHERE 0", NULL, NULL, NULL);
    if (!wait) sqlite3_busy_timeout(t->db, STORE_BUSY_MILLISECONDS);
    if (sq != SQLITE_OK) sqlite3_exec(t->db, "ROLLBACK", NULL, NULL, NULL);
    if ((sq & 0xff) == SQLITE_BUSY && !wait) return 0;
    if (sq != SQLITE_OK) return text_sql_error(t, sq, "updating the text index");
    /* The index's own marks and store, read under its write lock: no other update moves them. */
    int64_t chunks = 0, deletions = 0;
    char *kept_id = NULL;
    sqlite3_stmt *q = NULL;
    sq = sqlite3_prepare_v2(t->db,
                            "SELECT coalesce((SELECT value FROM text_meta WHERE key = 'chunks'), "
                            "0), coalesce((SELECT value FROM text_meta WHERE key = 'deletions'), "
                            "0), (SELECT value FROM text_meta WHERE key = 'store')",
                            -1, &q, NULL);
    if (sq == SQLITE_OK && (sq = sqlite3_step(q)) == SQLITE_ROW) {
        chunks = sqlite3_column_int64(q, 0);
        deletions = sqlite3_column_int64(q, 1);
        const char *id = (const char *)sqlite3_column_text(q, 2);
        if (id && !(kept_id = strdup(id))) sq = SQLITE_NOMEM;
    }
    sqlite3_finalize(q);
    if (sq != SQLITE_ROW) rc = text_sql_error(t, sq, "reading the text index's state");
    text_rows rows = {0};
    int64_t target = -1;
    char *store_id = NULL;
    bool changed = false;
    for (bool first = true; !rc; first = false) {
        int64_t st[3] = {0, 0, 1}, next = 0;
        free(store_id);
        rc = text_read(t, chunks, deletions, target < 0 ? INT64_MAX : target, st, &store_id, &rows,
                       &next);
        if (rc) break;
        if (first) {
            same = text_follows(kept_id && !strcmp(kept_id, store_id), chunks, deletions, st[0],
                                st[1], st[2]);
            target = st[0];
            if (!same) {
                /* Another store's index, or none yet: built again from every chunk. FTS5 keeps
                 * up to 64 MB of changes in memory (an indexer's update then writes one
                 * segment, not one a megabyte) and merges 16 segments of a level at a time, not
                 * 4: measured over 244,800 chunks of 113 words, 25-40% less time to build, with
                 * the same BM25 query times. The log is behind the chunks: nothing to unindex. */
                rc = text_exec(t,
                               "INSERT INTO chunk_text (chunk_text) VALUES ('delete-all');"
                               "INSERT INTO chunk_text (chunk_text, rank) VALUES ('hashsize', "
                               "67108864);"
                               "INSERT INTO chunk_text (chunk_text, rank) VALUES ('automerge', "
                               "16)",
                               "clearing the text index");
                chunks = 0;
                deletions = st[1];
                changed = true;
                continue; /* read again from the new marks */
            }
        }
        bool unindex = st[1] > deletions;
        if (!unindex && chunks >= target) break; /* up to date with the first snapshot */
        rc = text_apply(t, &rows, unindex, chunks);
        if (unindex)
            deletions = next;
        else
            chunks = next;
        changed = true;
    }
    if (!rc && changed) {
        sq = sqlite3_prepare_v2(t->db,
                                "INSERT OR REPLACE INTO text_meta (key, value) VALUES ('store', "
                                "?3), ('chunks', ?1), ('deletions', ?2)",
                                -1, &q, NULL);
        if (sq == SQLITE_OK) {
            sqlite3_bind_int64(q, 1, chunks);
            sqlite3_bind_int64(q, 2, deletions);
            sqlite3_bind_text(q, 3, store_id, -1, SQLITE_STATIC);
            sq = sqlite3_step(q);
        }
        sqlite3_finalize(q);
        if (sq != SQLITE_DONE) rc = text_sql_error(t, sq, "updating the text index");
    }
    free(kept_id);
    free(store_id);
    free(rows.ids);
    free(rows.ends);
    free(rows.text);
    if (!rc) rc = text_exec(t, "COMMIT", "updating the text index");
    if (rc) {
        sqlite3_exec(t->db, "ROLLBACK", NULL, NULL, NULL);
        return rc;
    }
    t->deletions = deletions;
    t->behind = 0;
    return 0;
}

int store_text_shards(const store *s)
{
    return s->format >= 4 ? s->text_shards : 1;
}

int store_text_open(store *s, int shard, store_text **out)
{
    *out = NULL;
    if (s->lock_fd < 0 || s->format < 4 || shard < 0 || shard >= s->text_shards) return 0;
    int rc = text_connect(s->path, shard, s->text_shards, true, out);
    if (!rc) {
        (*out)->elsewhere_of = s;
        s->text_elsewhere++;
    }
    return rc;
}

int store_text_update(store_text *t)
{
    return t ? text_update(t, true) : 0;
}

void store_text_close(store_text *t)
{
    if (t && t->elsewhere_of) t->elsewhere_of->text_elsewhere--;
    text_close(t);
}

/* ---- checkpoints on a thread of their own ----
 *
 * In WAL mode every page a transaction writes goes to the log first and is copied into the
 * store file by a checkpoint; SQLite runs one inside the commit that takes the log past 1,000
 * pages, so the writer's thread did both copies (on the GPU host, with the model ahead of it,
 * the store's thread was the slowest stage of indexing). A passive checkpoint from another
 * connection copies what no reader still needs, never waits for a lock, and is safe at any
 * moment against a killed process (the log stays until the copy is synced). The log starts again
 * from its beginning only when a write finds it wholly copied, and a copy stops at the oldest
 * reader's snapshot: with a reader holding one (the text index's updates did, for their whole
 * length, before they read in steps), the log grew to the size of everything written (779 MB for
 * 200,000 documents) and the last close copied it. So past STORE_WAL_FRAMES the writer's commit
 * copies what it can itself, and past twice that it waits for the copy. */
#define STORE_WAL_FRAMES 4096 /* 64 MB of 16 KB pages */

struct store_checkpointer {
    sqlite3 *db;
    store *of; /* its automatic checkpoints are back on at close */
};

/* SQLite's hook after each commit of the store's handle, with the frames in the log. */
static int wal_committed(void *ctx, sqlite3 *db, const char *name, int frames)
{
    (void)ctx;
    if (frames < STORE_WAL_FRAMES) return SQLITE_OK;
    int sq = sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    if (sq == SQLITE_BUSY && frames >= 2 * STORE_WAL_FRAMES)
        sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_FULL, NULL, NULL);
    return SQLITE_OK; /* a failed copy leaves the log as it was; the next commit tries again */
}

int store_checkpointer_open(store *s, store_checkpointer **out)
{
    *out = NULL;
    if (s->lock_fd < 0) return 0;
    store_checkpointer *c = calloc(1, sizeof *c);
    if (!c) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory opening %s", s->path);
    int sq = sqlite3_open_v2(s->path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    sqlite3_extended_result_codes(c->db, 1);
    /* A connection that has not read the file yet does not know it is in WAL mode: its
     * checkpoints would do nothing (measured: none copied a page). */
    if (sq == SQLITE_OK)
        sq = sqlite3_exec(c->db, "SELECT count(*) FROM sqlite_master", NULL, NULL, NULL);
    if (sq != SQLITE_OK) {
        int rc = sql_error_at(s->path, c->db, sq, "opening a connection for checkpoints");
        sqlite3_close(c->db);
        free(c);
        return rc;
    }
    sqlite3_wal_hook(s->db, wal_committed, NULL);
    c->of = s;
    *out = c;
    return 0;
}

int store_checkpoint(store_checkpointer *c)
{
    if (!c) return 0;
    int sq = sqlite3_wal_checkpoint_v2(c->db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    /* BUSY: another connection was checkpointing; the next call goes on from there. */
    if (sq == SQLITE_OK || sq == SQLITE_BUSY) return 0;
    return sql_error_at(c->of->path, c->db, sq, "copying the write-ahead log into the store");
}

void store_checkpointer_close(store_checkpointer *c)
{
    if (!c) return;
    sqlite3_wal_autocheckpoint(c->of->db, 1000); /* SQLite's default */
    sqlite3_close(c->db);
    free(c);
}

/* The connection BM25 runs on, and the prefix of the store's tables there. */
static sqlite3 *text_db(const store *s, int shard)
{
    return s->format >= 4 ? s->text[shard]->db : s->db;
}

static const char *store_tables(const store *s)
{
    return s->format >= 4 ? "store." : "";
}

int store_index_text(store *s)
{
    if (s->format < 4 || s->in_transaction) return 0;
    bool writer = s->lock_fd >= 0;
    if (writer && s->text[0] && s->text_pending == 0 && s->text_checked) return 0;
    int rc = 0;
    int64_t applied = INT64_MAX; /* log rows every shard has applied */
    for (int k = 0; k < s->text_shards && !rc; k++) {
        if (!s->text[k]) rc = text_connect(s->path, k, s->text_shards, writer, &s->text[k]);
        if (!rc) rc = text_update(s->text[k], writer);
        if (!rc && s->text[k]->deletions < applied) applied = s->text[k]->deletions;
    }
    if (rc || !writer) return rc;
    s->text_pending = 0;
    s->text_checked = true;
    /* The log rows the index has applied are not needed again. */
    if (applied > 0 && applied < INT64_MAX) {
        char sql[96];
        snprintf(sql, sizeof sql, "DELETE FROM text_log WHERE seq <= %" PRId64, applied);
        rc = exec(s, sql, "clearing the text index's log");
    }
    return rc;
}

/* ---- transactions ---- */

static int run(store *s, sqlite3_stmt *st, const char *what);

/* Before a COMMIT: the chunk ids given out in this transaction are recorded. */
static int close_writes(store *s, const char *what)
{
    if (!s->high_dirty) return 0;
    sqlite3_stmt *st = s->sql[SQL_SET_CHUNK_HIGH];
    sqlite3_bind_int64(st, 1, s->next_chunk - 1);
    return run(s, st, what);
}

/* After a COMMIT or ROLLBACK: the next transaction reads the high mark again. */
static void writes_closed(store *s)
{
    s->next_chunk = 0;
    s->high_dirty = false;
}

int store_begin(store *s)
{
    if (s->in_transaction)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "%s: a transaction is already open", s->path);
    int rc = exec(s, "BEGIN IMMEDIATE", "starting a batch");
    s->in_transaction = rc == 0;
    s->bumped = s->doomed = false;
    writes_closed(s);
    return rc;
}

int store_commit(store *s)
{
    if (!s->in_transaction) return 0;
    int rc = s->doomed
                 ? err_set(EMBEDRAG_ERR_IO,
                           "%s: a write of this batch failed, so it cannot be committed", s->path)
                 : close_writes(s, "committing a batch");
    if (!rc) rc = exec(s, "COMMIT", "committing a batch");
    if (rc) {
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
        track_rollback(s);
        err_prefix(rc, "nothing of this batch was stored: ");
    } else {
        track_commit(s);
    }
    writes_closed(s);
    s->in_transaction = false;
    if (!rc && !s->text_elsewhere && s->text_pending >= STORE_TEXT_INDEX_BATCH)
        rc = store_index_text(s);
    return rc;
}

void store_rollback(store *s)
{
    if (!s->in_transaction) return;
    sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
    track_rollback(s);
    writes_closed(s);
    s->in_transaction = false;
}

/* ---- documents ---- */

/* Runs a prepared statement to completion (no rows wanted). */
static int run(store *s, sqlite3_stmt *st, const char *what)
{
    int sq = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return sq == SQLITE_DONE ? 0 : sql_error(s, sq, what);
}

/* The row id of the document with this key, 0 when absent, or a negative status. */
static int64_t find_document(store *s, const char *key, uint64_t *content_hash)
{
    sqlite3_stmt *st = s->sql[SQL_FIND_DOCUMENT];
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    int sq = sqlite3_step(st);
    int64_t id = 0;
    if (sq == SQLITE_ROW) {
        id = sqlite3_column_int64(st, 0);
        if (content_hash) *content_hash = (uint64_t)sqlite3_column_int64(st, 1);
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (sq != SQLITE_ROW && sq != SQLITE_DONE) return sql_error(s, sq, "finding a document");
    return id;
}

int store_find_document(store *s, const char *key, bool *found, uint64_t *content_hash)
{
    *found = false;
    *content_hash = 0;
    int64_t id = find_document(s, key, content_hash);
    if (id < 0) return (int)id;
    *found = id > 0;
    return 0;
}

struct store_lookup {
    sqlite3 *db;
    sqlite3_stmt *find;
    char *path;
};

void store_lookup_close(store_lookup *l)
{
    if (!l) return;
    sqlite3_finalize(l->find);
    if (l->db) sqlite3_close(l->db);
    free(l->path);
    free(l);
}

int store_lookup_open(const store *s, store_lookup **out)
{
    *out = NULL;
    store_lookup *l = calloc(1, sizeof *l);
    if (!l || !(l->path = strdup(s->path))) {
        free(l);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory opening %s", s->path);
    }
    int sq = sqlite3_open_v2(s->path, &l->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (sq == SQLITE_OK) {
        sqlite3_busy_timeout(l->db, STORE_BUSY_MILLISECONDS);
        sq = sqlite3_prepare_v3(l->db, statements[SQL_FIND_DOCUMENT], -1, SQLITE_PREPARE_PERSISTENT,
                                &l->find, NULL);
    }
    if (sq != SQLITE_OK) {
        int rc = err_set(EMBEDRAG_ERR_IO, "%s: cannot open a second connection: %s", s->path,
                         l->db ? sqlite3_errmsg(l->db) : sqlite3_errstr(sq));
        store_lookup_close(l);
        return rc;
    }
    *out = l;
    return 0;
}

int store_lookup_find(store_lookup *l, const char *key, bool *found, uint64_t *content_hash)
{
    *found = false;
    *content_hash = 0;
    sqlite3_bind_text(l->find, 1, key, -1, SQLITE_STATIC);
    int sq = sqlite3_step(l->find);
    if (sq == SQLITE_ROW) {
        *found = true;
        *content_hash = (uint64_t)sqlite3_column_int64(l->find, 1);
    }
    sqlite3_reset(l->find);
    sqlite3_clear_bindings(l->find);
    if (sq != SQLITE_ROW && sq != SQLITE_DONE)
        return err_set(EMBEDRAG_ERR_IO, "%s: finding a document: %s", l->path,
                       sqlite3_errmsg(l->db));
    return 0;
}

static void bind_document(sqlite3_stmt *st, const store_document *d)
{
    sqlite3_bind_text(st, 2, d->source, -1, SQLITE_STATIC);
    if (d->title)
        sqlite3_bind_text(st, 3, d->title, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 3);
    if (d->metadata)
        sqlite3_bind_text(st, 4, d->metadata, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 4);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)d->content_hash);
    sqlite3_bind_int64(st, 6, d->size);
    sqlite3_bind_int64(st, 7, d->mtime);
}

/* A chunk was added. Past the memory allowed, tracking stops (the next load reads SQLite). */
static void track_add(store *s, int64_t id, const float *vector)
{
    if (!s->track.on) return;
    size_t dim = (size_t)s->model.dimension;
    if (s->track.count == s->track.capacity) {
        size_t grown = s->track.capacity ? 2 * s->track.capacity : 4096;
        if (grown * (dim * sizeof(float) + sizeof(int64_t)) > s->track.max_bytes) {
            track_drop(s);
            return;
        }
        int64_t *ids = realloc(s->track.ids, grown * sizeof *ids);
        if (ids) s->track.ids = ids;
        float *vectors = realloc(s->track.vectors, grown * dim * sizeof *vectors);
        if (vectors) s->track.vectors = vectors;
        if (!ids || !vectors) {
            track_drop(s);
            return;
        }
        s->track.capacity = grown;
    }
    s->track.ids[s->track.count] = id;
    memcpy(s->track.vectors + s->track.count * dim, vector, dim * sizeof(float));
    s->track.count++;
    if (id < s->track.min_id) s->track.min_id = id;
}

/* A document's chunks are about to be deleted: their ids leave the copy. A chunk added since
 * tracking began (ids at or past the least one added) stops tracking instead: rare (a document
 * replaced twice in a run), and never wrong. */
static int track_delete(store *s, int64_t document)
{
    if (!s->track.on) return 0;
    sqlite3_stmt *st = s->sql[SQL_CHUNK_IDS];
    sqlite3_bind_int64(st, 1, document);
    int sq;
    while ((sq = sqlite3_step(st)) == SQLITE_ROW && s->track.on) {
        int64_t id = sqlite3_column_int64(st, 0);
        if (id >= s->track.min_id) {
            track_drop(s);
            break;
        }
        if (s->track.gone_count == s->track.gone_capacity) {
            size_t grown = s->track.gone_capacity ? 2 * s->track.gone_capacity : 256;
            int64_t *more = realloc(s->track.gone, grown * sizeof *more);
            if (!more) {
                track_drop(s);
                break;
            }
            s->track.gone = more;
            s->track.gone_capacity = grown;
        }
        s->track.gone[s->track.gone_count++] = id;
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return sq == SQLITE_ROW || sq == SQLITE_DONE ? 0
                                                 : sql_error(s, sq, "listing a document's chunks");
}

/* One change (a document stored or deleted) is its own transaction outside a batch. Inside one it
 * takes no savepoint of its own (a savepoint per document cost a third of the store's time: 1.9
 * s of 5.2 for 200,000 documents), so a write that fails half-way dooms the batch: store_commit
 * then rolls it back whole, and nothing of it is stored. */
static int write_start(store *s, const char *what)
{
    if (s->in_transaction) return 0;
    return exec(s, "BEGIN IMMEDIATE", what);
}

static int write_end(store *s, int rc, const char *what)
{
    if (s->in_transaction) {
        if (rc) s->doomed = true;
        return rc;
    }
    if (!rc) rc = close_writes(s, what);
    if (!rc) rc = exec(s, "COMMIT", what);
    if (rc) {
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
        track_rollback(s);
    } else {
        track_commit(s);
    }
    writes_closed(s);
    return rc;
}

/* The id of the next chunk: past every chunk id ever given (meta chunk_high), so that the text
 * index can tell new chunks from old by their ids alone. */
static int next_chunk_id(store *s, int64_t *id)
{
    if (!s->next_chunk) {
        sqlite3_stmt *st = s->sql[SQL_CHUNK_HIGH];
        int sq = sqlite3_step(st);
        int64_t high = sq == SQLITE_ROW ? sqlite3_column_int64(st, 0) : -1;
        sqlite3_reset(st);
        if (high < 0)
            return sq == SQLITE_ROW || sq == SQLITE_DONE
                       ? err_set(EMBEDRAG_ERR_FORMAT, "%s: the store has no chunk_high", s->path)
                       : sql_error(s, sq, "reading the next chunk's id");
        s->next_chunk = high + 1;
    }
    *id = s->next_chunk;
    return 0;
}

/* The generation changes once per transaction that changes chunks (readers compare it, never
 * count it). */
static int bump_generation(store *s, const char *what)
{
    if (s->in_transaction && s->bumped) return 0;
    int rc = run(s, s->sql[SQL_BUMP_GENERATION], what);
    if (!rc && s->in_transaction) s->bumped = true;
    return rc;
}

int store_put_document(store *s, const store_document *d, const store_chunk *chunks, size_t count)
{
    if (!d || !d->key || (count && !chunks))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "store_put_document: NULL argument");
    int dim = s->model.dimension;
    /* Everything that can be checked is checked before the first write, so that a bad chunk
     * fails its document alone, even inside a batch. */
    for (size_t i = 0; i < count; i++)
        if (!chunks[i].vector || (!chunks[i].text && chunks[i].length))
            return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "%s: chunk %zu of %s has no vector",
                           s->path, i, d->key);
    int rc = write_start(s, "storing a document");
    if (rc) return rc;
    int64_t id = find_document(s, d->key, NULL);
    if (id < 0) {
        rc = (int)id;
        goto undo;
    }
    bool replaced = id > 0;
    if (id > 0) {
        rc = track_delete(s, id);
        if (rc) goto undo;
        sqlite3_stmt *st = s->sql[SQL_DELETE_CHUNKS];
        sqlite3_bind_int64(st, 1, id);
        rc = run(s, st, "replacing a document's chunks");
        if (rc) goto undo;
        st = s->sql[SQL_UPDATE_DOCUMENT];
        sqlite3_bind_int64(st, 1, id);
        bind_document(st, d);
        rc = run(s, st, "updating a document");
    } else {
        sqlite3_stmt *st = s->sql[SQL_INSERT_DOCUMENT];
        sqlite3_bind_text(st, 1, d->key, -1, SQLITE_STATIC);
        bind_document(st, d);
        rc = run(s, st, "adding a document");
        id = sqlite3_last_insert_rowid(s->db);
    }
    if (rc) goto undo;
    for (size_t i = 0; i < count; i++) {
        const store_chunk *c = &chunks[i];
        sqlite3_stmt *st = s->sql[SQL_INSERT_CHUNK];
        sqlite3_bind_int64(st, 1, id);
        sqlite3_bind_int64(st, 2, (sqlite3_int64)i);
        sqlite3_bind_int64(st, 3, c->start);
        sqlite3_bind_int64(st, 4, c->end);
        sqlite3_bind_int(st, 5, c->tokens);
        sqlite3_bind_text(st, 6, c->text ? c->text : "", (int)c->length, SQLITE_STATIC);
        sqlite3_bind_blob(st, 7, c->vector, dim * (int)sizeof(float), SQLITE_STATIC);
        int64_t chunk_id = 0;
        rc = next_chunk_id(s, &chunk_id);
        if (rc) goto undo;
        sqlite3_bind_int64(st, 8, chunk_id);
        rc = run(s, st, "adding a chunk");
        if (rc) goto undo;
        s->next_chunk++;
        s->high_dirty = true;
        track_add(s, chunk_id, c->vector);
    }
    rc = bump_generation(s, "storing a document");
    if (rc) goto undo;
    rc = write_end(s, 0, "storing a document");
    if (!rc) s->text_pending += (int64_t)count + (replaced ? 1 : 0);
    return rc;
undo:
    write_end(s, rc, "storing a document");
    return rc;
}

int store_delete_document(store *s, const char *key, bool *found)
{
    *found = false;
    int64_t id = find_document(s, key, NULL);
    if (id <= 0) return (int)id;
    int rc = write_start(s, "deleting a document");
    if (rc) return rc;
    rc = track_delete(s, id);
    sqlite3_stmt *st = s->sql[SQL_DELETE_DOCUMENT];
    sqlite3_bind_int64(st, 1, id);
    if (!rc) rc = run(s, st, "deleting a document");
    if (!rc) rc = bump_generation(s, "deleting a document");
    rc = write_end(s, rc, "deleting a document");
    if (!rc) {
        *found = true;
        s->text_pending++;
    }
    return rc;
}

int store_each_document(store *s, int (*fn)(void *ctx, const char *key, const char *source),
                        void *ctx)
{
    sqlite3_stmt *st = NULL;
    int sq =
        sqlite3_prepare_v2(s->db, "SELECT key, source FROM documents ORDER BY key", -1, &st, NULL);
    int rc = 0;
    while (sq == SQLITE_OK && (sq = sqlite3_step(st)) == SQLITE_ROW && !rc) {
        rc = fn(ctx, (const char *)sqlite3_column_text(st, 0),
                (const char *)sqlite3_column_text(st, 1));
        sq = SQLITE_OK;
    }
    if (!rc && sq != SQLITE_DONE && sq != SQLITE_OK) rc = sql_error(s, sq, "listing documents");
    sqlite3_finalize(st);
    return rc;
}

/* ---- what searches read ---- */

/* The search copy: "<store>-vectors", every vector as one matrix with its chunk ids, written
 * whole after a load from the database and read back with two read() calls, because reading
 * the vectors out of the chunks table (where they sit among the texts) takes seconds for a
 * million chunks. It is a cache: valid only while its generation is the database's (every change
 * of the chunks bumps that in the same transaction), replaced by renaming a complete file over
 * it, and ignored, never trusted, when anything in it disagrees with the database. Layout, in
 * the host's byte order: the header, the ids (count int64), zeros to a multiple of 4 KB, the
 * matrix (count x dim float32). */
#define SIDE_MAGIC "EMBRVEC1"
#define SIDE_ALIGN 4096u

typedef struct side_header {
    char magic[8];
    uint32_t dim, reserved;
    uint64_t count, generation, matrix_offset;
} side_header;

/* read() or write() of all `bytes`, in pieces (one call moves at most ~2 GB). */
static bool transfer(int fd, void *buffer, size_t bytes, bool writing)
{
    char *p = buffer;
    while (bytes) {
        size_t piece = bytes < ((size_t)1 << 30) ? bytes : ((size_t)1 << 30);
        ssize_t n = writing ? write(fd, p, piece) : read(fd, p, piece);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        p += n;
        bytes -= (size_t)n;
    }
    return true;
}

static char *cache_path(const store *s, const char *name, const char *extra)
{
    return side_path(s->path, name, extra);
}

/* Writes the pieces to a temporary file beside the store and renames it over "<store>-NAME",
 * so that a reader sees the old file or the new one, never part of one. */
static bool replace_file(store *s, const char *name, const void *const *pieces, const size_t *sizes,
                         int count)
{
    char suffix[32];
    snprintf(suffix, sizeof suffix, ".%ld.tmp", (long)getpid());
    char *path = cache_path(s, name, NULL), *temporary = cache_path(s, name, suffix);
    int fd = temporary ? open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644) : -1;
    bool ok = fd >= 0 && path;
    for (int i = 0; ok && i < count; i++) ok = transfer(fd, (void *)pieces[i], sizes[i], true);
    if (ok) ok = fsync(fd) == 0;
    if (fd >= 0 && close(fd) != 0) ok = false;
    if (ok) ok = rename(temporary, path) == 0;
    if (!ok && temporary) unlink(temporary);
    free(path);
    free(temporary);
    return ok;
}

static uint64_t side_matrix_offset(uint64_t count)
{
    uint64_t end = sizeof(side_header) + count * sizeof(int64_t);
    return (end + SIDE_ALIGN - 1) / SIDE_ALIGN * SIDE_ALIGN;
}

/* The database's generation, or 0 for a format-1 store that has none. */
static int read_generation(store *s, uint64_t *generation)
{
    int rc = 0;
    char *value = read_meta(s, "generation", &rc);
    *generation = value ? strtoull(value, NULL, 10) : 0;
    free(value);
    return rc ? sql_error(s, rc, "reading the store's generation") : 0;
}

/* Opens the search copy when its header and size say it holds `count` vectors of this store's
 * width at `generation`; -1 otherwise (absent, stale or damaged). */
static int side_open(store *s, uint64_t generation, size_t count, side_header *h)
{
    char *path = cache_path(s, "vectors", NULL);
    int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    free(path);
    if (fd < 0) return -1;
    size_t dim = (size_t)s->model.dimension;
    struct stat st;
    if (transfer(fd, h, sizeof *h, false) && fstat(fd, &st) == 0 &&
        memcmp(h->magic, SIDE_MAGIC, 8) == 0 && h->dim == dim && h->count == count &&
        h->generation == generation && h->matrix_offset == side_matrix_offset(count) &&
        (uint64_t)st.st_size == h->matrix_offset + count * dim * sizeof(float))
        return fd;
    close(fd);
    return -1;
}

/* Reads the search copy when it is of this generation and count; false leaves nothing behind. */
static bool side_read(store *s, uint64_t generation, size_t count, float **matrix, int64_t **ids)
{
    size_t dim = (size_t)s->model.dimension;
    side_header h;
    int fd = side_open(s, generation, count, &h);
    if (fd < 0) return false;
    float *m = memory_alloc_huge(count * dim * sizeof *m);
    int64_t *d = malloc((count ? count : 1) * sizeof *d);
    bool ok = m && d && transfer(fd, d, count * sizeof *d, false) &&
              lseek(fd, (off_t)h.matrix_offset, SEEK_SET) == (off_t)h.matrix_offset &&
              transfer(fd, m, count * dim * sizeof *m, false);
    close(fd);
    if (!ok) {
        free(m);
        free(d);
        return false;
    }
    *matrix = m;
    *ids = d;
    return true;
}

/* Writes the search copy to a temporary file and renames it over the old one, so a reader sees
 * the old copy or the new one, never part of one. Failure (a read-only folder, a full disk) only
 * costs the next open the slow load. */
static bool side_write(store *s, uint64_t generation, size_t count, const float *matrix,
                       const int64_t *ids)
{
    size_t dim = (size_t)s->model.dimension;
    side_header h = {.dim = (uint32_t)dim,
                     .count = count,
                     .generation = generation,
                     .matrix_offset = side_matrix_offset(count)};
    memcpy(h.magic, SIDE_MAGIC, 8);
    static const char zeros[SIDE_ALIGN];
    const void *pieces[] = {&h, ids, zeros, matrix};
    size_t sizes[] = {sizeof h, count * sizeof *ids,
                      h.matrix_offset - sizeof h - count * sizeof *ids,
                      count * dim * sizeof *matrix};
    return replace_file(s, "vectors", pieces, sizes, 4);
}

static int load_from_database(store *s, size_t n, float **matrix, int64_t **chunk_ids,
                              size_t *count)
{
    size_t dim = (size_t)s->model.dimension;
    float *m = memory_alloc_huge((n ? n : 1) * dim * sizeof *m);
    int64_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (!m || !ids) {
        free(m);
        free(ids);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory loading %zu vectors", s->path, n);
    }
    sqlite3_stmt *st = NULL;
    int sq = sqlite3_prepare_v2(s->db, "SELECT id, vector FROM chunks ORDER BY id", -1, &st, NULL);
    size_t i = 0;
    int rc = 0;
    while (sq == SQLITE_OK && (sq = sqlite3_step(st)) == SQLITE_ROW && i < n) {
        if ((size_t)sqlite3_column_bytes(st, 1) != dim * sizeof(float)) {
            rc = err_set(EMBEDRAG_ERR_FORMAT,
                         "%s: chunk %" PRId64 " has a vector of %d bytes, not %zu (a damaged "
                         "store?)",
                         s->path, (int64_t)sqlite3_column_int64(st, 0), sqlite3_column_bytes(st, 1),
                         dim * sizeof(float));
            break;
        }
        ids[i] = sqlite3_column_int64(st, 0);
        memcpy(m + i * dim, sqlite3_column_blob(st, 1), dim * sizeof(float));
        i++;
        sq = SQLITE_OK;
    }
    if (!rc && sq != SQLITE_DONE && sq != SQLITE_OK) rc = sql_error(s, sq, "loading vectors");
    sqlite3_finalize(st);
    if (rc) {
        free(m);
        free(ids);
        return rc;
    }
    *matrix = m;
    *chunk_ids = ids;
    *count = i;
    return 0;
}

static int count_chunks(store *s, size_t *n)
{
    sqlite3_stmt *st = NULL;
    int sq = sqlite3_prepare_v2(s->db, "SELECT count(*) FROM chunks", -1, &st, NULL);
    if (sq == SQLITE_OK && (sq = sqlite3_step(st)) == SQLITE_ROW)
        *n = (size_t)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return sq == SQLITE_ROW ? 0 : sql_error(s, sq, "counting vectors");
}

/* Runs fn inside one read transaction (unless the handle's own write transaction is open), so
 * the generation, the count and the vectors it reads are of one snapshot. */
static int in_snapshot(store *s, int (*fn)(store *, void *), void *ctx)
{
    bool own = !s->in_transaction;
    int rc = own ? exec(s, "BEGIN", "reading the store") : 0;
    if (rc) return rc;
    rc = fn(s, ctx);
    if (own) sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL);
    return rc;
}

typedef struct tracked_row {
    int64_t id;
    size_t at; /* index in track.ids / track.vectors */
} tracked_row;

static int compare_rows(const void *a, const void *b)
{
    int64_t x = ((const tracked_row *)a)->id, y = ((const tracked_row *)b)->id;
    return (x > y) - (x < y);
}

static int compare_ids(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The vectors of the database's `n` chunks made from the base copy and the tracked changes,
 * in id order: the base's rows less the deleted ones, merged with the added ones. False (and
 * nothing allocated) when that cannot be done exactly: a write still open, a base copy gone or
 * replaced, or counts that disagree with the database. */
static bool tracked_build(store *s, size_t n, float **matrix, int64_t **chunk_ids)
{
    if (!s->track.on || s->in_transaction || s->track.count != s->track.committed) return false;
    size_t dim = (size_t)s->model.dimension, added = s->track.count;
    if (s->track.gone_count)
        qsort(s->track.gone, s->track.gone_count, sizeof *s->track.gone, compare_ids);
    size_t gone = 0;
    for (size_t i = 0; i < s->track.gone_count; i++)
        if (!gone || s->track.gone[i] != s->track.gone[gone - 1])
            s->track.gone[gone++] = s->track.gone[i];
    s->track.gone_count = s->track.gone_committed = gone;
    if (s->track.base_count < gone || s->track.base_count - gone + added != n) return false;
    float *base = NULL;
    int64_t *base_ids = NULL;
    if (s->track.base_count &&
        !side_read(s, s->track.base_generation, s->track.base_count, &base, &base_ids))
        return false;
    tracked_row *rows = malloc((added ? added : 1) * sizeof *rows);
    float *m = memory_alloc_huge((n ? n : 1) * dim * sizeof *m);
    int64_t *ids = malloc((n ? n : 1) * sizeof *ids);
    bool ok = rows && m && ids;
    for (size_t i = 0; ok && i < added; i++) rows[i] = (tracked_row){s->track.ids[i], i};
    if (ok) qsort(rows, added, sizeof *rows, compare_rows);
    size_t out = 0, b = 0, a = 0, g = 0;
    while (ok && (b < s->track.base_count || a < added)) {
        if (b < s->track.base_count) {
            int64_t id = base_ids[b];
            while (g < gone && s->track.gone[g] < id) g++;
            if (g < gone && s->track.gone[g] == id) {
                b++;
                continue;
            }
        }
        bool from_base = b < s->track.base_count && (a == added || base_ids[b] < rows[a].id);
        if (!from_base && b < s->track.base_count && base_ids[b] == rows[a].id) ok = false;
        if (!ok || out == n) {
            ok = false;
            break;
        }
        ids[out] = from_base ? base_ids[b] : rows[a].id;
        memcpy(m + out * dim, from_base ? base + b * dim : s->track.vectors + rows[a].at * dim,
               dim * sizeof *m);
        out++;
        if (from_base)
            b++;
        else
            a++;
    }
    free(base);
    free(base_ids);
    free(rows);
    if (!ok || out != n) {
        free(m);
        free(ids);
        return false;
    }
    *matrix = m;
    *chunk_ids = ids;
    return true;
}

/* What one snapshot reads: whether the search copy is current and, when `load`, the vectors
 * (from the copy when current, else from the database, then written to a new copy). */
typedef struct snapshot_job {
    bool load, current;
    uint64_t generation;
    float *matrix;
    int64_t *ids;
    size_t count;
} snapshot_job;

static int read_snapshot(store *s, void *ctx)
{
    snapshot_job *job = ctx;
    uint64_t generation = 0;
    size_t n = 0;
    int rc = read_generation(s, &generation);
    if (!rc) rc = count_chunks(s, &n);
    if (rc) return rc;
    job->generation = generation;
    if (!job->load) {
        side_header h;
        int fd = generation ? side_open(s, generation, n, &h) : -1;
        job->current = fd >= 0;
        if (fd >= 0) close(fd);
        return 0;
    }
    if (generation && side_read(s, generation, n, &job->matrix, &job->ids)) {
        job->count = n;
        job->current = true;
        if (s->track.on && !s->in_transaction) track_rebase(s, generation, n);
        return 0;
    }
    if (generation && tracked_build(s, n, &job->matrix, &job->ids)) {
        job->count = n;
    } else {
        rc = load_from_database(s, n, &job->matrix, &job->ids, &job->count);
        if (rc) return rc;
    }
    if (generation) job->current = side_write(s, generation, job->count, job->matrix, job->ids);
    /* The copy just written is the next base; without one (a read-only folder) there is none. */
    if (s->track.on && !s->in_transaction) {
        if (job->current)
            track_rebase(s, generation, job->count);
        else
            track_drop(s);
    }
    return 0;
}

int store_load_vectors(store *s, float **matrix, int64_t **chunk_ids, size_t *count,
                       uint64_t *generation)
{
    *matrix = NULL;
    *chunk_ids = NULL;
    *count = 0;
    snapshot_job job = {.load = true};
    int rc = in_snapshot(s, read_snapshot, &job);
    if (rc) return rc;
    *matrix = job.matrix;
    *chunk_ids = job.ids;
    *count = job.count;
    if (generation) *generation = job.generation;
    return 0;
}

/* The generation and chunk count of one snapshot, and whether the search copy holds them. */
typedef struct base_job {
    uint64_t generation;
    size_t count;
    bool current;
} base_job;

static int read_base(store *s, void *ctx)
{
    base_job *job = ctx;
    int rc = read_generation(s, &job->generation);
    if (!rc) rc = count_chunks(s, &job->count);
    if (rc || !job->generation) return rc;
    side_header h;
    int fd = job->count ? side_open(s, job->generation, job->count, &h) : -1;
    job->current = !job->count || fd >= 0;
    if (fd >= 0) close(fd);
    return 0;
}

int store_track_vectors(store *s, size_t max_bytes)
{
    if (s->lock_fd < 0 || s->in_transaction || s->track.on) return 0;
    base_job job = {0};
    int rc = in_snapshot(s, read_base, &job);
    if (rc || !job.current) return rc;
    s->track.on = true;
    s->track.max_bytes = max_bytes;
    track_rebase(s, job.generation, job.count);
    return 0;
}

int store_search_copy_current(store *s, bool *current)
{
    snapshot_job job = {.load = false};
    int rc = in_snapshot(s, read_snapshot, &job);
    *current = job.current;
    return rc;
}

/* Cache files ("<store>-NAME"): bytes derived from the vectors at one generation (the search's
 * quantized codes), checked and replaced like the search copy. Header: magic, generation,
 * payload bytes. */
#define CACHE_MAGIC "EMBRCACH"

typedef struct cache_header {
    char magic[8];
    uint64_t generation, bytes;
} cache_header;

int store_cache_read(store *s, const char *name, uint64_t generation, void **data, size_t *bytes)
{
    *data = NULL;
    *bytes = 0;
    char *path = cache_path(s, name, NULL);
    if (!path) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    free(path);
    if (fd < 0) return 0;
    cache_header h;
    struct stat st;
    void *buffer = NULL;
    if (generation && transfer(fd, &h, sizeof h, false) && fstat(fd, &st) == 0 &&
        memcmp(h.magic, CACHE_MAGIC, 8) == 0 && h.generation == generation &&
        (uint64_t)st.st_size == sizeof h + h.bytes && h.bytes > 0 && h.bytes <= SIZE_MAX) {
        buffer = malloc((size_t)h.bytes);
        if (buffer && !transfer(fd, buffer, (size_t)h.bytes, false)) {
            free(buffer);
            buffer = NULL;
        }
    }
    close(fd);
    if (buffer) {
        *data = buffer;
        *bytes = (size_t)h.bytes;
    }
    return 0;
}

bool store_cache_write(store *s, const char *name, uint64_t generation, const void *data,
                       size_t bytes)
{
    if (!generation) return false;
    cache_header h = {.generation = generation, .bytes = bytes};
    memcpy(h.magic, CACHE_MAGIC, 8);
    const void *pieces[] = {&h, data};
    size_t sizes[] = {sizeof h, bytes};
    return replace_file(s, name, pieces, sizes, 2);
}

int store_generation(store *s, uint64_t *generation)
{
    return read_generation(s, generation);
}

/* A byte of a word in a query: ASCII letters and digits, and every byte of a multi-byte UTF-8
 * character. */
static bool is_word_byte(unsigned char c)
{
    return c >= 0x80 || (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
}

/* How many chunks hold `word` (its document frequency in the text index), or -1 when unknown
 * (a word FTS5's tokenizer would split or fold other than plain ASCII lowercasing). */
static int64_t word_frequency(store *s, const char *word, size_t length)
{
    char folded[128];
    if (length >= sizeof folded) return -1;
    for (size_t i = 0; i < length; i++) {
        unsigned char c = (unsigned char)word[i];
        if (c >= 0x80) return -1;
        folded[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    int64_t frequency = 0;
    int shards = store_text_shards(s);
    for (int k = 0; k < shards; k++) {
        if (!s->vocabulary[k]) {
            /* A temporary view of the index's terms: a reader may create it too. */
            sqlite3 *db = text_db(s, k);
            if (sqlite3_exec(db,
                             "CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunk_terms USING "
                             "fts5vocab(main, chunk_text, 'row')",
                             NULL, NULL, NULL) != SQLITE_OK ||
                sqlite3_prepare_v2(db, "SELECT doc FROM temp.chunk_terms WHERE term = ?1", -1,
                                   &s->vocabulary[k], NULL) != SQLITE_OK)
                return -1;
        }
        sqlite3_stmt *st = s->vocabulary[k];
        sqlite3_bind_text(st, 1, folded, (int)length, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) frequency += sqlite3_column_int64(st, 0);
        sqlite3_reset(st);
    }
    return frequency;
}

/* The chunks the text index holds, counted once per generation of the store. */
static int64_t indexed_chunks(store *s)
{
    uint64_t generation = 0;
    if (read_generation(s, &generation) != 0) return -1;
    if (!generation || generation != s->counted_generation) {
        size_t n = 0;
        if (count_chunks(s, &n) != 0) return -1;
        s->counted_chunks = (int64_t)n;
        s->counted_generation = generation;
    }
    return s->counted_chunks;
}

/* Turns free text into an FTS5 query that matches any of its words: each run of letters and
 * digits (bytes >= 0x80 count as letters, so UTF-8 words stay whole) becomes a quoted string,
 * joined by OR; FTS5's tokenizer then splits them as it split the documents. Words that at
 * least half of the chunks hold are left out: FTS5's BM25 gives such a word an IDF of 1e-6
 * (its log((N - n + 0.5) / (n + 0.5)) is not positive), so it changes no score by more than a
 * few millionths, yet ranking every chunk that holds "a" or "the" was most of a query's time
 * (70 of 130 ms at 100,000 chunks). Unless every word is that common. Returns NULL when the text
 * has no words. */
static char *fts_query(store *s, const char *text)
{
    size_t n = strlen(text);
    char *q = malloc(4 * n + 8), *w = q;
    if (!q) return NULL;
    int64_t chunks = indexed_chunks(s);
    bool any = false;
    for (int pass = 0; pass < 2 && !any; pass++) {
        /* Pass 0 leaves out the common words; pass 1 keeps them (all were common). */
        for (size_t i = 0; i < n;) {
            if (!is_word_byte((unsigned char)text[i])) {
                i++;
                continue;
            }
            size_t start = i;
            while (i < n && is_word_byte((unsigned char)text[i])) i++;
            if (pass == 0 && chunks > 0) {
                int64_t frequency = word_frequency(s, text + start, i - start);
                if (frequency >= 0 && 2 * frequency >= chunks) continue;
            }
            if (any) w += sprintf(w, " OR ");
            *w++ = '"';
            memcpy(w, text + start, i - start);
            w += i - start;
            *w++ = '"';
            any = true;
        }
    }
    *w = '\0';
    if (!any) {
        free(q);
        return NULL;
    }
    return q;
}

bool store_filter_active(const store_filter *f)
{
    return f && ((f->source_glob && *f->source_glob) || f->count > 0);
}

/* Appends the filter's conditions on documents `d` to `sql` (" AND ..." each) and records the
 * values to bind from parameter `first` on. */
typedef struct filter_sql {
    char *text;     /* the conditions */
    char **paths;   /* each key's JSON path ('$."key"'), owned */
    int parameters; /* bound from `first` on: [glob], then (path, value) per key */
} filter_sql;

static void filter_sql_free(filter_sql *q, int count)
{
    for (int i = 0; q->paths && i < count; i++) free(q->paths[i]);
    free(q->paths);
    free(q->text);
}

static int filter_sql_build(store *s, const store_filter *f, int first, filter_sql *q)
{
    memset(q, 0, sizeof *q);
    int count = f ? f->count : 0;
    size_t room = 64 + (size_t)count * 192;
    q->text = malloc(room);
    q->paths = calloc((size_t)(count ? count : 1), sizeof *q->paths);
    if (!q->text || !q->paths) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    size_t w = 0;
    q->text[0] = '\0';
    int p = first;
    if (f && f->source_glob && *f->source_glob)
        w += (size_t)snprintf(q->text + w, room - w, " AND d.source GLOB ?%d", p++);
    for (int i = 0; i < count; i++) {
        const char *key = f->keys ? f->keys[i] : NULL;
        if (!key || !*key || strchr(key, '"') || !f->values || !f->values[i])
            return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                           "%s: a metadata filter needs a field name without '\"' and a value",
                           s->path);
        q->paths[i] = malloc(strlen(key) + 5);
        if (!q->paths[i]) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
        sprintf(q->paths[i], "$.\"%s\"", key);
        /* A string field compares as its text, anything else as its JSON text. */
        w += (size_t)snprintf(q->text + w, room - w,
                              " AND (CASE json_type(d.metadata, ?%d) WHEN 'text' THEN "
                              "json_extract(d.metadata, ?%d) ELSE d.metadata -> ?%d END) = ?%d",
                              p, p, p, p + 1);
        p += 2;
    }
    q->parameters = p - first;
    return 0;
}

static void filter_sql_bind(sqlite3_stmt *st, const store_filter *f, const filter_sql *q, int first)
{
    int p = first;
    if (f && f->source_glob && *f->source_glob)
        sqlite3_bind_text(st, p++, f->source_glob, -1, SQLITE_STATIC);
    for (int i = 0; f && i < f->count; i++) {
        sqlite3_bind_text(st, p++, q->paths[i], -1, SQLITE_STATIC);
        sqlite3_bind_text(st, p++, f->values[i], -1, SQLITE_STATIC);
    }
}

int store_filter_chunks(store *s, const store_filter *filter,
                        int (*fn)(void *ctx, int64_t chunk_id), void *ctx)
{
    filter_sql q;
    int rc = filter_sql_build(s, filter, 1, &q);
    char *sql = NULL;
    if (!rc && asprintf(&sql,
                        "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document "
                        "WHERE 1%s ORDER BY c.id",
                        q.text) < 0) {
        sql = NULL;
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    }
    sqlite3_stmt *st = NULL;
    if (!rc) {
        int sq = sqlite3_prepare_v2(s->db, sql, -1, &st, NULL);
        if (sq != SQLITE_OK) rc = sql_error(s, sq, "filtering documents");
    }
    if (!rc) {
        filter_sql_bind(st, filter, &q, 1);
        int sq;
        while (!rc && (sq = sqlite3_step(st)) == SQLITE_ROW)
            rc = fn(ctx, sqlite3_column_int64(st, 0));
        if (!rc && sq != SQLITE_DONE) rc = sql_error(s, sq, "filtering documents");
    }
    sqlite3_finalize(st);
    free(sql);
    filter_sql_free(&q, filter ? filter->count : 0);
    return rc;
}

/* One shard's best matches for FTS5 query `q`: up to k chunk ids and scores, best first. With
 * `weights` (a text index of several shards) each row is scored by embedrag_bm25 with the
 * statistics of all shards; without, by FTS5's bm25(). */
static int bm25_shard(store *s, int shard, const char *q, const store_filter *filter, int k,
                      const void *weights, size_t weight_bytes, int64_t *chunk_ids, double *scores,
                      int *found)
{
    *found = 0;
    sqlite3 *db = text_db(s, shard);
    const char *tables = store_tables(s);
    const char *score = weights ? "embedrag_bm25(chunk_text, ?4)" : "-bm25(chunk_text)";
    const char *order = weights ? "score DESC, chunk_text.rowid" : "bm25(chunk_text)";
    filter_sql fq = {0};
    char *sql = NULL;
    bool filtered = store_filter_active(filter);
    int rc = 0;
    /* The text index drives the query. Unfiltered, its best matches are checked against the
     * chunks, as many more of them as the index may hold chunks deleted since its last update (a
     * reader's search does not wait for another connection's update; joining every match
     * instead cost 124 ms a query against 75 over 100,000 chunks). Filtered, each match is
     * joined to its chunk and its document. Parameters: ?1 the query, ?2 k, ?3 k and the chunks
     * that may be gone, ?4 the weights, the filter's from ?5. */
    if (filtered) rc = filter_sql_build(s, filter, 5, &fq);
    sqlite3_stmt *st = filtered ? NULL : s->bm25[shard];
    int made = 0;
    if (!rc && !st && filtered)
        made = asprintf(&sql,
                        "SELECT chunk_text.rowid, %s AS score FROM chunk_text JOIN %schunks c "
                        "ON c.id = chunk_text.rowid JOIN %sdocuments d ON d.id = c.document WHERE "
                        "chunk_text MATCH ?1%s ORDER BY %s LIMIT ?2",
                        score, tables, tables, fq.text, order);
    else if (!rc && !st)
        made = asprintf(&sql,
                        "SELECT hit.id, hit.score FROM (SELECT rowid AS id, %s AS score FROM "
                        "chunk_text WHERE chunk_text MATCH ?1 ORDER BY %s LIMIT ?3) AS hit WHERE "
                        "EXISTS (SELECT 1 FROM %schunks c WHERE c.id = hit.id) ORDER BY hit.score "
                        "DESC%s LIMIT ?2",
                        score, weights ? "score DESC, rowid" : order, tables,
                        weights ? ", hit.id" : "");
    if (made < 0) {
        sql = NULL;
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    }
    if (!rc && !st) {
        int sq = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
        if (sq != SQLITE_OK) rc = sql_error_at(s->path, db, sq, "searching text");
        if (!rc && !filtered) s->bm25[shard] = st;
    }
    if (!rc && filtered) filter_sql_bind(st, filter, &fq, 5);
    int sq = SQLITE_DONE, n = 0;
    if (!rc) {
        sqlite3_bind_text(st, 1, q, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 2, k);
        if (!filtered) {
            int64_t behind = s->text[shard] ? s->text[shard]->behind : 0;
            sqlite3_bind_int64(st, 3, (int64_t)k + (behind < INT32_MAX ? behind : INT32_MAX));
        }
        if (weights) sqlite3_bind_blob(st, 4, weights, (int)weight_bytes, SQLITE_STATIC);
        while ((sq = sqlite3_step(st)) == SQLITE_ROW && n < k) {
            chunk_ids[n] = sqlite3_column_int64(st, 0);
            scores[n] = sqlite3_column_double(st, 1);
            n++;
        }
        if (sq != SQLITE_DONE && sq != SQLITE_ROW)
            rc = sql_error_at(s->path, db, sq, "searching text");
    }
    if (filtered) {
        sqlite3_finalize(st);
    } else if (st) {
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
    }
    free(sql);
    filter_sql_free(&fq, filter ? filter->count : 0);
    if (!rc) *found = n;
    return rc;
}

/* The weights that score every shard's rows as one index of all of them would (bm25.h): the
 * shards' row and token totals, and the rows of each that hold each phrase of `q`. Read by the
 * shards' connections, each in the read transaction its search goes on in. *weights stays NULL
 * where no shard matches. */
static int bm25_statistics(store *s, const char *q, void **weights, size_t *bytes)
{
    *weights = NULL;
    int64_t rows = 0, tokens = 0, *hits = NULL;
    int phrases = -1, rc = 0;
    for (int k = 0; k < s->text_shards && !rc; k++) {
        sqlite3 *db = text_db(s, k);
        int64_t r = 0, t = 0;
        int sq = bm25_totals(db, &r, &t);
        rows += r;
        tokens += t;
        sqlite3_stmt *st = NULL;
        if (sq == SQLITE_OK)
            sq = sqlite3_prepare_v2(db,
                                    "SELECT embedrag_bm25_hits(chunk_text) FROM chunk_text WHERE "
                                    "chunk_text MATCH ?1 LIMIT 1",
                                    -1, &st, NULL);
        if (sq == SQLITE_OK) {
            sqlite3_bind_text(st, 1, q, -1, SQLITE_STATIC);
            sq = sqlite3_step(st);
        }
        if (sq == SQLITE_ROW) {
            int n = sqlite3_column_bytes(st, 0) / (int)sizeof(int64_t);
            const unsigned char *blob = sqlite3_column_blob(st, 0);
            if (phrases < 0 && !(hits = calloc(n > 0 ? (size_t)n : 1, sizeof *hits))) {
                rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
            } else if (phrases >= 0 && n != phrases) {
                rc = err_set(EMBEDRAG_ERR_DATABASE,
                             "%s: the text index's shards read the query differently", s->path);
            } else {
                phrases = n;
                for (int i = 0; i < n; i++) {
                    int64_t h;
                    memcpy(&h, blob + (size_t)i * sizeof h, sizeof h);
                    hits[i] += h;
                }
            }
            sq = SQLITE_DONE;
        }
        if (!rc && sq != SQLITE_DONE) rc = sql_error_at(s->path, db, sq, "searching text");
        sqlite3_finalize(st);
    }
    if (!rc && phrases > 0 && !(*weights = bm25_weights(rows, tokens, hits, phrases, bytes)))
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    free(hits);
    return rc;
}

/* Orders hits best first: by score, then by chunk id (the shards' merge is deterministic). */
typedef struct bm25_hit {
    int64_t id;
    double score;
} bm25_hit;

static int bm25_hit_order(const void *a, const void *b)
{
    const bm25_hit *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

int store_bm25(store *s, const char *query, const store_filter *filter, int k, int64_t *chunk_ids,
               double *scores, int *found)
{
    *found = 0;
    if (k <= 0 || !query) return 0;
    /* The text index is brought up to date first: a writer's search sees everything it
     * committed, a reader's what was committed (unless another connection is updating the index
     * just then: it searches the index as it is). */
    int rc = store_index_text(s);
    if (rc) return rc;
    char *q = fts_query(s, query);
    if (!q) return 0; /* no words: nothing matches */
    int shards = store_text_shards(s);
    if (shards == 1) {
        rc = bm25_shard(s, 0, q, filter, k, NULL, 0, chunk_ids, scores, found);
        free(q);
        return rc;
    }
    /* Several shards: each searched with the statistics of all, in one read transaction a
     * shard (its statistics and its rows from one snapshot), and their best merged. */
    for (int i = 0; i < shards && !rc; i++)
        if (sqlite3_exec(text_db(s, i), "BEGIN", NULL, NULL, NULL) != SQLITE_OK)
            rc = sql_error_at(s->path, text_db(s, i), SQLITE_ERROR, "searching text");
    void *weights = NULL;
    size_t bytes = 0;
    if (!rc) rc = bm25_statistics(s, q, &weights, &bytes);
    bm25_hit *all = weights ? malloc((size_t)shards * (size_t)k * sizeof *all) : NULL;
    int64_t *ids = weights ? malloc((size_t)k * sizeof *ids) : NULL;
    double *values = weights ? malloc((size_t)k * sizeof *values) : NULL;
    if (weights && (!all || !ids || !values)) rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    size_t count = 0;
    for (int i = 0; i < shards && weights && !rc; i++) {
        int n = 0;
        rc = bm25_shard(s, i, q, filter, k, weights, bytes, ids, values, &n);
        for (int j = 0; j < n && !rc; j++) all[count++] = (bm25_hit){ids[j], values[j]};
    }
    for (int i = 0; i < shards; i++) sqlite3_exec(text_db(s, i), "COMMIT", NULL, NULL, NULL);
    if (!rc && count) {
        qsort(all, count, sizeof *all, bm25_hit_order);
        int n = count < (size_t)k ? (int)count : k;
        for (int j = 0; j < n; j++) {
            chunk_ids[j] = all[j].id;
            scores[j] = all[j].score;
        }
        *found = n;
    }
    free(all);
    free(ids);
    free(values);
    free(weights);
    free(q);
    return rc;
}

int store_get_chunk(store *s, int64_t chunk_id, store_chunk_info *out)
{
    sqlite3_stmt *st = s->sql[SQL_GET_CHUNK];
    sqlite3_bind_int64(st, 1, chunk_id);
    int sq = sqlite3_step(st);
    if (sq == SQLITE_DONE) {
        sqlite3_reset(st);
        return err_set(EMBEDRAG_ERR_NOT_FOUND, "%s: no chunk %" PRId64, s->path, chunk_id);
    }
    if (sq != SQLITE_ROW) {
        sqlite3_reset(st);
        return sql_error(s, sq, "reading a chunk");
    }
    /* The row is copied out and the statement reset at once: a statement left on its row would
     * hold a read snapshot open until the next call, so this handle would not see later commits
     * and the writer's checkpoints could not get past it (the write-ahead log would grow while
     * a server sat idle). The strings stay valid until the next call. */
    const char *fields[5];
    size_t lengths[5], need = 0;
    for (int i = 0; i < 5; i++) {
        fields[i] = (const char *)sqlite3_column_text(st, i);
        lengths[i] = fields[i] ? (size_t)sqlite3_column_bytes(st, i) + 1 : 0;
        need += lengths[i];
    }
    if (need > s->row_capacity) {
        char *grown = realloc(s->row, need);
        if (!grown) {
            sqlite3_reset(st);
            return err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory reading chunk %" PRId64,
                           s->path, chunk_id);
        }
        s->row = grown;
        s->row_capacity = need;
    }
    const char *copies[5];
    char *at = s->row;
    for (int i = 0; i < 5; i++) {
        copies[i] = fields[i] ? memcpy(at, fields[i], lengths[i]) : NULL;
        at += lengths[i];
    }
    out->document_key = copies[0];
    out->source = copies[1];
    out->title = copies[2];
    out->metadata = copies[3];
    out->text = copies[4];
    out->start = sqlite3_column_int64(st, 5);
    out->end = sqlite3_column_int64(st, 6);
    out->ordinal = sqlite3_column_int(st, 7);
    out->tokens = sqlite3_column_int(st, 8);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return 0;
}

int store_document_chunks(store *s, const char *key, bool *found,
                          int (*fn)(void *ctx, const store_chunk_info *chunk), void *ctx)
{
    *found = false;
    sqlite3_stmt *st = NULL;
    int sq = sqlite3_prepare_v2(s->db,
                                "SELECT d.key, d.source, d.title, d.metadata, c.text, c.start, "
                                "c.end, c.ordinal, c.tokens FROM documents d LEFT JOIN chunks c "
                                "ON c.document = d.id WHERE d.key = ?1 ORDER BY c.ordinal",
                                -1, &st, NULL);
    if (sq != SQLITE_OK) return sql_error(s, sq, "reading a document");
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    int rc = 0;
    while (!rc && (sq = sqlite3_step(st)) == SQLITE_ROW) {
        *found = true;
        bool chunk = sqlite3_column_type(st, 4) != SQLITE_NULL;
        store_chunk_info info = {.document_key = (const char *)sqlite3_column_text(st, 0),
                                 .source = (const char *)sqlite3_column_text(st, 1),
                                 .title = (const char *)sqlite3_column_text(st, 2),
                                 .metadata = (const char *)sqlite3_column_text(st, 3),
                                 .text = chunk ? (const char *)sqlite3_column_text(st, 4) : NULL,
                                 .start = sqlite3_column_int64(st, 5),
                                 .end = sqlite3_column_int64(st, 6),
                                 .ordinal = chunk ? sqlite3_column_int(st, 7) : -1,
                                 .tokens = sqlite3_column_int(st, 8)};
        rc = fn(ctx, &info);
    }
    if (!rc && sq != SQLITE_DONE) rc = sql_error(s, sq, "reading a document");
    sqlite3_finalize(st);
    return rc;
}

/* The size of the store's file (name NULL) or of one beside it (side_path), 0 when absent. */
static int64_t file_size(const char *store_path, const char *name, const char *extra)
{
    char *path = name ? side_path(store_path, name, extra) : NULL;
    struct stat fs;
    int64_t size = stat(name ? path : store_path, &fs) == 0 ? (int64_t)fs.st_size : 0;
    free(path);
    return size;
}

int store_get_stats(store *s, store_stats *out)
{
    memset(out, 0, sizeof *out);
    sqlite3_stmt *st = NULL;
    int sq = sqlite3_prepare_v2(s->db,
                                "SELECT (SELECT count(*) FROM documents), count(*), "
                                "coalesce(sum(tokens), 0) FROM chunks",
                                -1, &st, NULL);
    if (sq == SQLITE_OK && (sq = sqlite3_step(st)) == SQLITE_ROW) {
        out->documents = sqlite3_column_int64(st, 0);
        out->chunks = sqlite3_column_int64(st, 1);
        out->tokens = sqlite3_column_int64(st, 2);
    }
    sqlite3_finalize(st);
    if (sq != SQLITE_ROW) return sql_error(s, sq, "counting");
    out->file_bytes = file_size(s->path, NULL, NULL) + file_size(s->path, "wal", NULL);
    out->text_index_bytes = 0;
    int shards = store_text_shards(s);
    for (int k = 0; k < shards; k++) {
        char name[32];
        text_name(k, shards, name);
        out->text_index_bytes += file_size(s->path, name, NULL) + file_size(s->path, name, "-wal");
    }
    out->search_copy_bytes = file_size(s->path, "vectors", NULL);
    return store_search_copy_current(s, &out->search_copy_current);
}
