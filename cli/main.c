/* The `embedrag` command: dispatches to one subcommand per file (embed, tokenize, info, bench;
 * index, search and stats share store.c); the helpers they share are in common.c. */
#include "cli.h"

#include <string.h>

#ifndef EMBEDRAG_DEFAULT_MODEL_DIR
#define EMBEDRAG_DEFAULT_MODEL_DIR "models/all-MiniLM-L6-v2"
#endif

static const char usage[] =
    "usage: embedrag <command> [options]\n"
    "\n"
    "Sentence embeddings with BERT-family models (CPU: fp32, or bf16 where the CPU has AMX-BF16\n"
    "or AVX512-BF16).\n"
    "\n"
    "commands:\n"
    "  embed      embed one text per line (stdin or --input) and print one vector per line\n"
    "  tokenize   print the token ids and tokens of each line\n"
    "  info       print facts about a model as JSON\n"
    "  bench      measure latency and throughput, print JSON\n"
    "  index      index folders and JSONL files of documents into a store\n"
    "  search     search a store: dense, BM25 or hybrid\n"
    "  stats      describe a store\n"
    "  serve      serve embeddings and search over HTTP (OpenAI and TEI compatible)\n"
    "\n"
    "Each command takes --help. The model is --model DIR, else $EMBEDRAG_MODEL, "
    "else\n" EMBEDRAG_DEFAULT_MODEL_DIR " (fetched by scripts/fetch-models.sh).\n";

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs(usage, stderr);
        return 2;
    }
    const char *command = argv[1];
    if (!strcmp(command, "--help") || !strcmp(command, "-h") || !strcmp(command, "help")) {
        fputs(usage, stdout);
        return 0;
    }
    if (!strcmp(command, "--version")) {
        printf("embedrag %s\n", embedrag_version());
        return 0;
    }
    if (!strcmp(command, "embed")) return cli_embed(argc - 1, argv + 1);
    if (!strcmp(command, "tokenize")) return cli_tokenize(argc - 1, argv + 1);
    if (!strcmp(command, "info")) return cli_info(argc - 1, argv + 1);
    if (!strcmp(command, "bench")) return cli_bench(argc - 1, argv + 1);
    if (!strcmp(command, "index")) return cli_index(argc - 1, argv + 1);
    if (!strcmp(command, "search")) return cli_search(argc - 1, argv + 1);
    if (!strcmp(command, "stats")) return cli_stats(argc - 1, argv + 1);
    if (!strcmp(command, "serve")) return cli_serve(argc - 1, argv + 1);
    fprintf(stderr, "embedrag: unknown command '%s' (try embedrag --help)\n", command);
    return 2;
}
