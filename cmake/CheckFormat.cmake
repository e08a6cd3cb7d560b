# Fails when a tracked .c or .h file is not as clang-format writes it (.clang-format), naming the
# files. Run by the test_format test:
#   cmake -DCLANG_FORMAT=<clang-format> -DSOURCE_DIR=<tree> -P cmake/CheckFormat.cmake
# Fix with: clang-format -i <files>
cmake_minimum_required(VERSION 3.25)
if(NOT CLANG_FORMAT)
  message(FATAL_ERROR "clang-format not found (scripts/install-deps.sh installs it)")
endif()

# The files git tracks; in a tree without git, every .c and .h below the source folders.
execute_process(COMMAND git -c core.quotePath=false ls-files -- "*.c" "*.h"
                WORKING_DIRECTORY ${SOURCE_DIR} OUTPUT_VARIABLE tracked RESULT_VARIABLE git_rc
                ERROR_QUIET)
if(git_rc EQUAL 0)
  string(REPLACE "\n" ";" files "${tracked}")
  list(FILTER files EXCLUDE REGEX "^$")
else()
  file(GLOB_RECURSE files RELATIVE ${SOURCE_DIR} ${SOURCE_DIR}/*.c ${SOURCE_DIR}/*.h)
  list(FILTER files EXCLUDE REGEX "^(build[^/]*|\\.[^/]*)/")
endif()
list(LENGTH files count)
if(count EQUAL 0)
  message(FATAL_ERROR "no .c or .h files found in ${SOURCE_DIR}")
endif()

execute_process(COMMAND ${CLANG_FORMAT} --dry-run -Werror ${files}
                WORKING_DIRECTORY ${SOURCE_DIR} RESULT_VARIABLE rc ERROR_VARIABLE diagnostics)
if(NOT rc EQUAL 0)
  # Diagnostics read "file.c:12:3: error: code should be clang-formatted [...]".
  string(REGEX MATCHALL "[^\n:]+\\.[ch]:[0-9]+:[0-9]+: error" hits "${diagnostics}")
  set(bad "")
  foreach(hit IN LISTS hits)
    string(REGEX REPLACE ":[0-9]+:[0-9]+: error$" "" name "${hit}")
    list(APPEND bad ${name})
  endforeach()
  list(REMOVE_DUPLICATES bad)
  if(bad STREQUAL "")
    message(FATAL_ERROR "${CLANG_FORMAT} failed (status ${rc}):\n${diagnostics}")
  endif()
  list(JOIN bad "\n  " bad_lines)
  message(FATAL_ERROR "not formatted as .clang-format says (fix: ${CLANG_FORMAT} -i FILE):\n"
                      "  ${bad_lines}")
endif()
execute_process(COMMAND ${CLANG_FORMAT} --version OUTPUT_VARIABLE version
                OUTPUT_STRIP_TRAILING_WHITESPACE)
message(STATUS "${count} files formatted (${version})")
