/* A small example of the public API: embeds the lines of stdin with the model in argv[1] and
 * prints the matrix of cosine similarities (dot products of the normalized vectors). */
#include "embedrag.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LINES 64

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: similarity MODEL_DIR < texts.txt (at most %d lines)\n", MAX_LINES);
        return 2;
    }
    char *texts[MAX_LINES];
    size_t n = 0, cap = 0;
    char *line = NULL;
    ssize_t len;
    while (n < MAX_LINES && (len = getline(&line, &cap, stdin)) >= 0) {
        if (len > 0 && line[len - 1] == '\n') line[len - 1] = '\0';
        texts[n++] = strdup(line);
    }
    free(line);
    embedrag_model *model = NULL;
    if (embedrag_model_open(argv[1], NULL, &model) != 0) {
        fprintf(stderr, "similarity: %s\n", embedrag_last_error());
        return 1;
    }
    int dim = embedrag_embed_dimension(model, NULL);
    float *vectors = malloc(sizeof(float) * n * (size_t)dim);
    if (embedrag_embed(model, (const char *const *)texts, NULL, n, NULL, vectors) != 0) {
        fprintf(stderr, "similarity: %s\n", embedrag_last_error());
        return 1;
    }
    for (size_t i = 0; i < n; i++) printf("[%zu] %s\n", i, texts[i]);
    printf("\n     ");
    for (size_t j = 0; j < n; j++) printf("   [%2zu]", j);
    printf("\n");
    for (size_t i = 0; i < n; i++) {
        printf("[%2zu] ", i);
        for (size_t j = 0; j < n; j++) {
            double dot = 0;
            for (int k = 0; k < dim; k++)
                dot += (double)vectors[i * (size_t)dim + (size_t)k] *
                       vectors[j * (size_t)dim + (size_t)k];
            printf(" %6.3f", dot);
        }
        printf("\n");
    }
    for (size_t i = 0; i < n; i++) free(texts[i]);
    free(vectors);
    embedrag_model_close(model);
    return 0;
}
