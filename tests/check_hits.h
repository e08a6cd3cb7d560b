/* What the dense-search tests (test_scan, test_quant) compare: two result lists, the same rows in
 * the same order with the same score bits. */
#ifndef EMBEDRAG_TESTS_CHECK_HITS_H
#define EMBEDRAG_TESTS_CHECK_HITS_H

#include "store/scan.h"

#include <stdbool.h>
#include <string.h>

static inline bool check_same_hits(const scan_hit *a, size_t na, const scan_hit *b, size_t nb)
{
    if (na != nb) return false;
    for (size_t i = 0; i < na; i++)
        if (a[i].row != b[i].row || memcmp(&a[i].score, &b[i].score, sizeof(float)) != 0)
            return false;
    return true;
}

#endif
