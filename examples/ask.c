/* Indexes files into a store and answers a question from it, with the library API:
 *
 *   ask MODEL_DIR STORE "question" [PATH...]
 *
 * PATHs (folders of .txt and .md files, text files, JSONL files of documents) are added first;
 * unchanged documents are skipped, so asking again costs one query. Prints the five best
 * passages by hybrid search (BM25 and cosine, fused), with their sources and byte offsets. */
#include "embedrag.h"

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: ask MODEL_DIR STORE \"question\" [PATH...]\n");
        return 2;
    }
    embedrag_model *model = NULL;
    embedrag_store *store = NULL;
    int status = 1;
    if (embedrag_model_open(argv[1], NULL, &model) != 0 ||
        embedrag_store_open(argv[2], model, NULL, &store) != 0) {
        fprintf(stderr, "ask: %s\n", embedrag_last_error());
        goto done;
    }
    for (int i = 4; i < argc; i++) {
        long failed = 0;
        if (embedrag_store_add_path(store, argv[i], &failed) != 0) {
            fprintf(stderr, "ask: %s\n", embedrag_last_error());
            goto done;
        }
        if (failed)
            fprintf(stderr, "ask: %ld documents skipped: %s\n", failed, embedrag_last_error());
    }
    embedrag_search_params params = embedrag_search_default_params();
    params.k = 5;
    params.mode = EMBEDRAG_SEARCH_HYBRID;
    embedrag_search_result results[5];
    int found = 0;
    if (embedrag_store_search(store, argv[3], &params, results, &found) != 0) {
        fprintf(stderr, "ask: %s\n", embedrag_last_error());
        goto done;
    }
    for (int i = 0; i < found; i++)
        printf("%d. %s [bytes %lld-%lld] %.4f\n   %.200s\n", i + 1, results[i].source,
               (long long)results[i].start, (long long)results[i].end, results[i].score,
               results[i].text);
    status = 0;
done:
    embedrag_store_close(store);
    embedrag_model_close(model);
    return status;
}
