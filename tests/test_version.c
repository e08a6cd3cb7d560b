/* The version is written once, in include/embedrag.h: the library linked reports the header's
 * string, the numeric macro agrees with the three parts, and CMake read the same numbers from the
 * header (EMBEDRAG_CMAKE_VERSION, passed by CMakeLists.txt, is what project(), the soname,
 * embedrag.pc and the package config use). */
#include "embedrag.h"

#include "check.h"

#include <stdio.h>
#include <string.h>

#ifndef EMBEDRAG_CMAKE_VERSION
#error "CMakeLists.txt passes EMBEDRAG_CMAKE_VERSION to this test"
#endif

int main(void)
{
    CHECK(strcmp(embedrag_version(), EMBEDRAG_VERSION_STRING) == 0,
          "embedrag_version() is \"%s\", the header says \"%s\"", embedrag_version(),
          EMBEDRAG_VERSION_STRING);
    CHECK(strcmp(EMBEDRAG_CMAKE_VERSION, EMBEDRAG_VERSION_STRING) == 0,
          "CMake's version is \"%s\", the header says \"%s\"", EMBEDRAG_CMAKE_VERSION,
          EMBEDRAG_VERSION_STRING);

    /* The string is the three numbers joined by dots, and the number encodes them. */
    char joined[32];
    snprintf(joined, sizeof joined, "%d.%d.%d", EMBEDRAG_VERSION_MAJOR, EMBEDRAG_VERSION_MINOR,
             EMBEDRAG_VERSION_PATCH);
    CHECK(strcmp(joined, EMBEDRAG_VERSION_STRING) == 0, "\"%s\" vs \"%s\"", joined,
          EMBEDRAG_VERSION_STRING);
    CHECK(EMBEDRAG_VERSION_MINOR < 100 && EMBEDRAG_VERSION_PATCH < 100,
          "minor and patch must stay below 100 for EMBEDRAG_VERSION_NUMBER");
    int major, minor, patch;
    CHECK(sscanf(embedrag_version(), "%d.%d.%d", &major, &minor, &patch) == 3 &&
              major * 10000 + minor * 100 + patch == EMBEDRAG_VERSION_NUMBER,
          "embedrag_version() \"%s\" does not encode to %d", embedrag_version(),
          EMBEDRAG_VERSION_NUMBER);
    return check_finish("test_version");
}
