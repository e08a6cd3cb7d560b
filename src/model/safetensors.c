/* safetensors reader: maps a file read-only and checks its header before anything trusts it.
 * Every byte range is proven to lie inside the data area, to match dtype x shape, and not to
 * overlap another tensor, so later code can read tensor data without further checks. */
#include "model/model.h"

#include "util/error.h"
#include "util/json.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Real headers are a few hundred bytes per tensor (about 11 KB for a 6-layer BERT, under 1 MB
 * for the largest checkpoints); a larger length is a corrupt or hostile file, and bounding it
 * bounds what cJSON allocates. */
#define ST_MAX_HEADER_BYTES (100u * 1000u * 1000u)

/* Room for "<file name> header" in messages: the error buffer holds 1024 bytes in all. */
#define ST_LABEL_BYTES 1024

/* Element sizes of the dtypes the format defines. Only F32, F16 and BF16 are ever read; the
 * others are sized so their ranges can still be checked. Names not listed are accepted as
 * ST_OTHER without a size check: a newer dtype in a tensor nobody needs must not make the whole
 * file unreadable. */
static const struct {
    const char *name;
    st_dtype dtype;
    size_t size;
} st_dtype_table[] = {
    {"F32", ST_F32, 4},    {"F16", ST_F16, 2},       {"BF16", ST_BF16, 2},
    {"F64", ST_OTHER, 8},  {"I64", ST_OTHER, 8},     {"I32", ST_OTHER, 4},
    {"I16", ST_OTHER, 2},  {"I8", ST_OTHER, 1},      {"U64", ST_OTHER, 8},
    {"U32", ST_OTHER, 4},  {"U16", ST_OTHER, 2},     {"U8", ST_OTHER, 1},
    {"BOOL", ST_OTHER, 1}, {"F8_E4M3", ST_OTHER, 1}, {"F8_E5M2", ST_OTHER, 1},
    {"C64", ST_OTHER, 8},  {"F8_E8M0", ST_OTHER, 1},
};

/* A dtype name must look like one (upper-case letters, digits, '_') so that messages quoting it
 * stay readable and a garbage header is caught early. */
static bool st_dtype_name_valid(const char *s)
{
    if (!*s) return false;
    for (; *s; s++)
        if (!((*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '_')) return false;
    return true;
}

/* Reads a JSON number that must be an exact non-negative integer; no offset or dimension of a
 * real file comes near the 2^53 where doubles stop being exact. */
static bool st_json_uint(const cJSON *item, uint64_t *out)
{
    int64_t value;
    if (!json_integer(item, 0, JSON_MAX_EXACT_INTEGER, &value)) return false;
    *out = (uint64_t)value;
    return true;
}

static void st_free_tensors(st_tensor *tensors, int count)
{
    for (int i = 0; i < count; i++) free(tensors[i].name);
    free(tensors);
}

/* Fills `t` from one header entry; `data`/`data_size` describe the data area after the header. */
static int st_parse_tensor(const cJSON *entry, const char *name, const unsigned char *data,
                           size_t data_size, st_tensor *t)
{
    char text[64];
    if (!cJSON_IsObject(entry))
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: tensor '%s': header entry is %s, not an object",
                       name, entry->string, json_value_text(entry, text, sizeof text));

    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(entry, "dtype");
    if (!cJSON_IsString(dtype))
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: tensor '%s': dtype is missing or not a string",
                       name, entry->string);
    if (strlen(dtype->valuestring) >= sizeof t->dtype_name ||
        !st_dtype_name_valid(dtype->valuestring))
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: tensor '%s': dtype '%.32s' is not a dtype name",
                       name, entry->string, dtype->valuestring);
    strcpy(t->dtype_name, dtype->valuestring);
    t->dtype = ST_OTHER;
    size_t element_size = 0; /* 0: unknown dtype, size not checked */
    for (size_t i = 0; i < sizeof st_dtype_table / sizeof st_dtype_table[0]; i++) {
        if (strcmp(st_dtype_table[i].name, t->dtype_name) == 0) {
            t->dtype = st_dtype_table[i].dtype;
            element_size = st_dtype_table[i].size;
        }
    }

    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(entry, "shape");
    if (!cJSON_IsArray(shape))
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: tensor '%s': shape is missing or not an array",
                       name, entry->string);
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > ST_MAX_DIMS)
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: tensor '%s': shape has %d dimensions, at most %d",
                       name, entry->string, ndim, ST_MAX_DIMS);
    t->ndim = 0;
    uint64_t elements = 1;
    bool overflow = false;
    const cJSON *dim;
    cJSON_ArrayForEach(dim, shape)
    {
        uint64_t v;
        if (!st_json_uint(dim, &v))
            return err_set(EMBEDRAG_ERR_FORMAT,
                           "%s: tensor '%s': shape entry %d is %s, not a non-negative integer",
                           name, entry->string, t->ndim, json_value_text(dim, text, sizeof text));
        t->shape[t->ndim++] = (int64_t)v;
        /* Keep multiplying after an overflow only to find a zero dimension, which makes the
         * tensor empty and the product well defined again. */
        if (__builtin_mul_overflow(elements, v, &elements)) overflow = true;
    }
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] == 0) {
            overflow = false;
            elements = 0;
        }
    }

    const cJSON *offsets = cJSON_GetObjectItemCaseSensitive(entry, "data_offsets");
    uint64_t begin, end;
    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2 ||
        !st_json_uint(cJSON_GetArrayItem(offsets, 0), &begin) ||
        !st_json_uint(cJSON_GetArrayItem(offsets, 1), &end))
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: tensor '%s': data_offsets is %s, expected [begin, end] with two "
                       "non-negative integers",
                       name, entry->string,
                       offsets ? json_value_text(offsets, text, sizeof text) : "missing");
    if (end < begin)
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: tensor '%s': data_offsets [%llu, %llu] end before they begin", name,
                       entry->string, (unsigned long long)begin, (unsigned long long)end);
    if (end > data_size)
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: tensor '%s': data_offsets [%llu, %llu] reach past the data area of "
                       "%zu bytes (file truncated?)",
                       name, entry->string, (unsigned long long)begin, (unsigned long long)end,
                       data_size);
    uint64_t nbytes;
    if (element_size) {
        if (overflow || __builtin_mul_overflow(elements, (uint64_t)element_size, &nbytes))
            return err_set(EMBEDRAG_ERR_FORMAT,
                           "%s: tensor '%s': shape %s overflows a 64-bit byte count", name,
                           entry->string, json_value_text(shape, text, sizeof text));
        if (nbytes != end - begin)
            return err_set(EMBEDRAG_ERR_FORMAT,
                           "%s: tensor '%s': shape %s of %s needs %llu bytes, data_offsets "
                           "[%llu, %llu] hold %llu",
                           name, entry->string, json_value_text(shape, text, sizeof text),
                           t->dtype_name, (unsigned long long)nbytes, (unsigned long long)begin,
                           (unsigned long long)end, (unsigned long long)(end - begin));
    }
    t->data = data + begin;
    t->nbytes = (size_t)(end - begin);
    return 0;
}

static int st_compare_names(const void *a, const void *b)
{
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

static int st_compare_ranges(const void *a, const void *b)
{
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    if (x->data != y->data) return (const char *)x->data < (const char *)y->data ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

/* Rejects two tensors of one name (st_find could return either) and overlapping byte ranges
 * (writing one tensor's buffer in place must never change another). Sorts by name. */
static int st_check_unique(st_file *file, const char *name, const unsigned char *data)
{
    qsort(file->tensors, (size_t)file->tensor_count, sizeof *file->tensors, st_compare_names);
    for (int i = 1; i < file->tensor_count; i++)
        if (strcmp(file->tensors[i - 1].name, file->tensors[i].name) == 0)
            return err_set(EMBEDRAG_ERR_FORMAT, "%s: tensor '%s' appears twice in the header", name,
                           file->tensors[i].name);

    const st_tensor **by_range = malloc((size_t)file->tensor_count * sizeof *by_range + 1);
    if (!by_range) return err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory", name);
    for (int i = 0; i < file->tensor_count; i++) by_range[i] = &file->tensors[i];
    qsort(by_range, (size_t)file->tensor_count, sizeof *by_range, st_compare_ranges);
    int rc = 0;
    const st_tensor *previous = NULL; /* the non-empty tensor reaching furthest so far */
    for (int i = 0; i < file->tensor_count && rc == 0; i++) {
        const st_tensor *t = by_range[i];
        if (t->nbytes == 0) continue; /* empty tensors occupy no bytes */
        const unsigned char *begin = t->data;
        if (previous && begin < (const unsigned char *)previous->data + previous->nbytes) {
            const unsigned char *pb = previous->data;
            rc = err_set(
                EMBEDRAG_ERR_FORMAT, "%s: tensors '%s' [%zu, %zu] and '%s' [%zu, %zu] overlap",
                name, previous->name, (size_t)(pb - data), (size_t)(pb - data) + previous->nbytes,
                t->name, (size_t)(begin - data), (size_t)(begin - data) + t->nbytes);
        }
        if (!previous ||
            begin + t->nbytes > (const unsigned char *)previous->data + previous->nbytes)
            previous = t;
    }
    free(by_range);
    return rc;
}

int st_parse(const void *data, size_t size, const char *name, st_file **out)
{
    *out = NULL;
    const unsigned char *bytes = data;
    if (size < 8)
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: file is %zu bytes, too short for the 8-byte header length", name, size);
    uint64_t header_length = 0;
    for (int i = 7; i >= 0; i--) header_length = header_length << 8 | bytes[i];
    if (header_length > ST_MAX_HEADER_BYTES)
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: header length %llu is absurd (more than %u bytes); not a "
                       "safetensors file?",
                       name, (unsigned long long)header_length, ST_MAX_HEADER_BYTES);
    if (header_length > size - 8)
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: header length %llu runs past the end of the %zu-byte file (file "
                       "truncated?)",
                       name, (unsigned long long)header_length, size);

    int rc = 0;
    st_file *file = calloc(1, sizeof *file);
    if (!file) return err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory", name);
    file->path = strdup(name);
    if (!file->path) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory", name);
        goto free_file;
    }

    /* The format pads the header with spaces so that the data area starts aligned; json_parse
     * allows whitespace after the value and nothing else. */
    size_t json_length = (size_t)header_length;
    char label[ST_LABEL_BYTES];
    snprintf(label, sizeof label, "%s header", name);
    cJSON *root;
    rc = json_parse((const char *)bytes + 8, json_length, label, &root);
    if (rc) goto free_file;
    if (!cJSON_IsObject(root)) {
        rc = err_set(EMBEDRAG_ERR_FORMAT, "%s: header is JSON but not an object", name);
        goto free_root;
    }

    int entries = cJSON_GetArraySize(root);
    file->tensors = calloc((size_t)entries + 1, sizeof *file->tensors);
    if (!file->tensors) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory for %d tensors", name, entries);
        goto free_root;
    }
    const unsigned char *data_area = bytes + 8 + json_length;
    size_t data_size = size - 8 - json_length;
    const cJSON *entry;
    cJSON_ArrayForEach(entry, root)
    {
        if (strcmp(entry->string, "__metadata__") == 0) {
            if (!cJSON_IsObject(entry)) {
                rc = err_set(EMBEDRAG_ERR_FORMAT, "%s: __metadata__ is not an object", name);
                goto free_root;
            }
            continue;
        }
        st_tensor *t = &file->tensors[file->tensor_count];
        rc = st_parse_tensor(entry, name, data_area, data_size, t);
        if (rc) goto free_root;
        t->name = strdup(entry->string);
        if (!t->name) {
            rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory", name);
            goto free_root;
        }
        file->tensor_count++;
    }
    rc = st_check_unique(file, name, data_area);
    if (rc) goto free_root;

    cJSON_Delete(root);
    *out = file;
    return 0;

free_root:
    cJSON_Delete(root);
free_file:
    st_close(file);
    return rc;
}

int st_open(const char *path, st_file **out)
{
    *out = NULL;
    int rc = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_set(EMBEDRAG_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = err_set(EMBEDRAG_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto close_fd;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = err_set(EMBEDRAG_ERR_IO, "%s: not a regular file", path);
        goto close_fd;
    }
    size_t size = (size_t)st.st_size;
    if (size < 8) { /* also keeps mmap away from an empty file, which it refuses */
        rc = err_set(EMBEDRAG_ERR_FORMAT,
                     "%s: file is %zu bytes, too short for the 8-byte header length", path, size);
        goto close_fd;
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        rc = err_set(EMBEDRAG_ERR_IO, "%s: cannot map %zu bytes: %s", path, size, strerror(errno));
        goto close_fd;
    }
    st_file *file;
    rc = st_parse(map, size, path, &file);
    if (rc) goto unmap;
    file->map = map;
    file->map_size = size;
    close(fd); /* the mapping stays valid without the descriptor */
    *out = file;
    return 0;

unmap:
    munmap(map, size);
close_fd:
    close(fd);
    return rc;
}

float st_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1f;
    uint32_t mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) { /* inf, or NaN with its payload kept */
        bits = sign | 0x7f800000u | mantissa << 13;
    } else if (exponent != 0) { /* normal: rebias 15 -> 127 */
        bits = sign | (exponent + 112) << 23 | mantissa << 13;
    } else if (mantissa == 0) {
        bits = sign;
    } else {
        /* Subnormal half (mantissa x 2^-24) is a normal float: shift the leading 1 into the
         * implicit bit and lower the exponent once per shift. */
        exponent = 113;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | exponent << 23 | (mantissa & 0x3ff) << 13;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

float st_bf16_to_f32(uint16_t h)
{
    /* bfloat16 is the upper half of a float32, so every value (subnormals, inf, NaN) widens
     * exactly by a shift. */
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

const st_tensor *st_find(const st_file *file, const char *name)
{
    /* Tensors are sorted by name (st_check_unique). */
    int lo = 0, hi = file->tensor_count - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(file->tensors[mid].name, name);
        if (c == 0) return &file->tensors[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return NULL;
}

void st_close(st_file *file)
{
    if (!file) return;
    if (file->map) munmap(file->map, file->map_size);
    st_free_tensors(file->tensors, file->tensor_count);
    free((char *)file->path);
    free(file);
}
