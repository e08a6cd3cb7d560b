/* CPU feature detection against the Linux kernel's own view: /proc/cpuinfo lists a feature only
 * when the CPU has it and the kernel enabled its register state, which is what
 * cpu_features_get() must report too. */
#include "util/cpu_features.h"

#include "check.h"

#include <stdbool.h>
#include <string.h>

/* Whether the first "flags" line of /proc/cpuinfo names `flag`; -1 when it cannot be read. */
static int cpuinfo_has(const char *flag)
{
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return -1;
    char line[8192];
    int found = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "flags", 5) == 0) {
            found = 0;
            for (char *word = strtok(strchr(line, ':') + 1, " \n"); word;
                 word = strtok(NULL, " \n"))
                if (strcmp(word, flag) == 0) found = 1;
            break;
        }
    fclose(f);
    return found;
}

static void test_features_match_cpuinfo(void)
{
    const cpu_features *f = cpu_features_get();
    const struct {
        const char *flag;
        bool detected;
    } expected[] = {
        {"avx2", f->avx2},         {"fma", f->fma},
        {"f16c", f->f16c},         {"avx512f", f->avx512f},
        {"avx512dq", f->avx512dq}, {"avx512bw", f->avx512bw},
        {"avx512vl", f->avx512vl}, {"avx512_bf16", f->avx512_bf16},
        {"amx_tile", f->amx_tile}, {"amx_bf16", f->amx_bf16},
    };
    if (cpuinfo_has("fpu") < 0) {
        printf("no /proc/cpuinfo flags here: nothing to compare\n");
        return;
    }
    for (size_t i = 0; i < sizeof expected / sizeof *expected; i++) {
        int listed = cpuinfo_has(expected[i].flag);
        printf("%-12s detected %d, /proc/cpuinfo %d\n", expected[i].flag, expected[i].detected,
               listed);
        CHECK(listed == (int)expected[i].detected, "%s: detected %d, /proc/cpuinfo %d",
              expected[i].flag, expected[i].detected, listed);
    }
}

static void test_features_are_computed_once(void)
{
    CHECK(cpu_features_get() == cpu_features_get(), "one feature set per process");
    bool permitted = cpu_features_amx_permitted();
    CHECK(!permitted || cpu_features_get()->amx_tile, "AMX permitted without AMX tiles");
    CHECK(cpu_features_amx_permitted() == permitted, "the AMX answer changed");
}

int main(void)
{
    test_features_match_cpuinfo();
    test_features_are_computed_once();
    return check_finish("test_cpu_features");
}
