/* Huge-page buffers (memory.h). */
#include "util/memory.h"

#include <stdlib.h>
#include <sys/mman.h>

void *memory_alloc_huge(size_t bytes)
{
    void *p = NULL;
    if (posix_memalign(&p, MEMORY_HUGE_PAGE_BYTES, bytes ? bytes : 1) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    /* Before the first touch, so that the pages are faulted in as huge ones. */
    madvise(p, bytes ? bytes : 1, MADV_HUGEPAGE);
#endif
    return p;
}
