"""embedrag as one more peer of run_peers.py: the shared library (build/libembedrag.so) called
in-process through ctypes, so it takes its turns in the same interleaved slices as PyTorch and
ONNX Runtime and the ratios compare like with like on a machine whose capacity drifts.

The ctypes call adds microseconds per batch (building the char* array), which is charged to
embedrag, as Python-side overhead is charged to the other peers.
"""

import ctypes
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_LIBRARY = os.path.join(REPO, "build", "libembedrag.so")


# These mirror include/embedrag.h field for field: the default_params functions return them by
# value, so a missing field would corrupt the call.
class _ModelParams(ctypes.Structure):
    _fields_ = [("threads", ctypes.c_int), ("precision", ctypes.c_int), ("device", ctypes.c_int)]


class _ModelInfo(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("dimension", ctypes.c_int), ("max_tokens", ctypes.c_int),
                ("layers", ctypes.c_int), ("hidden", ctypes.c_int), ("heads", ctypes.c_int),
                ("vocab_size", ctypes.c_int), ("pooling", ctypes.c_int), ("normalize", ctypes.c_bool),
                ("lowercase", ctypes.c_bool), ("prompt_count", ctypes.c_int),
                ("default_prompt_name", ctypes.c_char_p), ("intermediate", ctypes.c_int),
                ("precision", ctypes.c_int), ("backend_count", ctypes.c_int)]


DEVICE_CPU = 1
PRECISIONS = {"fp32": 0, "bf16": 1}


class _EmbedParams(ctypes.Structure):
    _fields_ = [("prompt_name", ctypes.c_char_p), ("prompt", ctypes.c_char_p), ("normalize", ctypes.c_bool),
                ("dimensions", ctypes.c_int), ("truncate", ctypes.c_bool), ("batch_tokens", ctypes.c_int),
                ("device", ctypes.c_int), ("lane", ctypes.c_int), ("statuses", ctypes.POINTER(ctypes.c_int))]


def setup_embedrag(args):
    """Returns (encode, tokens_of, stages, info) like the other setups of run_peers.py."""
    import numpy as np

    path = os.environ.get("EMBEDRAG_LIBRARY", DEFAULT_LIBRARY)
    lib = ctypes.CDLL(path)
    lib.embedrag_version.restype = ctypes.c_char_p
    lib.embedrag_last_error.restype = ctypes.c_char_p
    lib.embedrag_model_default_params.restype = _ModelParams
    lib.embedrag_embed_default_params.restype = _EmbedParams
    lib.embedrag_model_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(_ModelParams), ctypes.POINTER(ctypes.c_void_p)]
    lib.embedrag_embed_dimension.argtypes = [ctypes.c_void_p, ctypes.POINTER(_EmbedParams)]
    lib.embedrag_embed.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t),
                                   ctypes.c_size_t, ctypes.POINTER(_EmbedParams), ctypes.c_void_p]
    lib.embedrag_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_EmbedParams),
                                      ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]

    lib.embedrag_model_get_info.argtypes = [ctypes.c_void_p, ctypes.POINTER(_ModelInfo)]

    precision = "bf16" if args.child.endswith("-bf16") else "fp32"
    params = lib.embedrag_model_default_params()
    params.threads = args.threads
    params.precision = PRECISIONS[precision]
    params.device = DEVICE_CPU  # the peers are compared on the CPU
    model = ctypes.c_void_p()
    if lib.embedrag_model_open(args.model.encode(), ctypes.byref(params), ctypes.byref(model)) != 0:
        raise RuntimeError("embedrag: " + lib.embedrag_last_error().decode())
    info = _ModelInfo()
    lib.embedrag_model_get_info(model, ctypes.byref(info))
    if info.precision != PRECISIONS[precision]:
        # Timing the fp32 fallback under the bf16 label would misreport both.
        raise RuntimeError("embedrag: this CPU cannot run %s (it needs AMX-BF16 or AVX512-BF16)" % precision)
    embed_params = lib.embedrag_embed_default_params()
    dim = lib.embedrag_embed_dimension(model, ctypes.byref(embed_params))

    def encode(items):
        data = [t.encode("utf-8") for t in items]
        n = len(data)
        texts = (ctypes.c_char_p * n)(*data)
        lengths = (ctypes.c_size_t * n)(*[len(d) for d in data])
        out = np.empty((n, dim), dtype=np.float32)
        rc = lib.embedrag_embed(model, texts, lengths, n, ctypes.byref(embed_params), out.ctypes.data)
        if rc != 0:
            raise RuntimeError("embedrag: " + lib.embedrag_last_error().decode())
        return out

    def tokens_of(text):
        data = text.encode("utf-8")
        count = ctypes.c_size_t()
        lib.embedrag_tokenize(model, data, len(data), ctypes.byref(embed_params), None, 0, ctypes.byref(count))
        return count.value

    info = {
        "versions": {"embedrag": lib.embedrag_version().decode()},
        "settings": "libembedrag.so through ctypes, %s, %d threads, default token budget" % (precision, args.threads),
    }
    return encode, tokens_of, None, info
