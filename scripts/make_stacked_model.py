#!/usr/bin/env python3
"""Derives a 12-layer, 384-wide BERT test model from a 6-layer one (all-MiniLM-L6-v2).

No PyPI package ships e5-small-v2 or bge-small, so we build a checkpoint of their shape by
repeating each encoder layer twice (layer i -> layers 2i and 2i+1), stored as F16 safetensors so
the F16 loading path is exercised, with e5-style "query: " / "passage: " prompts.

Usage: python3 scripts/make_stacked_model.py SRC_DIR DST_DIR
Standard library only: CI machines have a plain python3 without numpy or torch.
"""

import array
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time

REPEAT = 2  # each source layer appears this many times in a row
PROMPTS = {"query": "query: ", "passage": "passage: "}
COPIED_FILES = [
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
]
COPIED_DIRS = ["1_Pooling"]
# A registered buffer, not a weight: integer typed, recomputed by every loader, so not stored.
DROPPED_TENSORS = {"embeddings.position_ids", "bert.embeddings.position_ids"}
LAYER_NAME = re.compile(r"^(.*encoder\.layer\.)(\d+)(\..+)$")
# Floats converted per struct call: large enough that the per-call overhead vanishes, small
# enough that the boxed Python floats of one chunk stay a few tens of MB.
CHUNK_FLOATS = 1 << 20


def read_safetensors_header(path):
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return header, 8 + header_len


def f32_to_f16_bytes(raw):
    """Little-endian F32 bytes -> little-endian F16 bytes, round-to-nearest-even like torch.half().

    struct's 'e' format rounds half to even from the exact double value of each float32, which is
    a single correct rounding. It raises OverflowError where torch would give +-inf, so that rare
    case falls back to an element-wise pass.
    """
    values = array.array("f")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    out = bytearray()
    for start in range(0, len(values), CHUNK_FLOATS):
        chunk = values[start : start + CHUNK_FLOATS]
        try:
            out += struct.pack("<%de" % len(chunk), *chunk)
        except OverflowError:
            for v in chunk:
                try:
                    out += struct.pack("<e", v)
                except OverflowError:
                    out += struct.pack("<e", float("inf") if v > 0 else float("-inf"))
    return bytes(out)


def natural_key(name):
    # encoder.layer.10 after encoder.layer.9, so the file reads in forward-pass order.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def plan_tensors(header):
    """Returns [(dst_name, src_name)] in output order, and the source layer count."""
    plan = []
    layers = set()
    for name, info in header.items():
        if name == "__metadata__" or name in DROPPED_TENSORS:
            continue
        if info["dtype"] not in ("F32", "F16"):
            raise SystemExit("make_stacked_model: %s has dtype %s; expected F32 or F16" % (name, info["dtype"]))
        m = LAYER_NAME.match(name)
        if m is None:
            plan.append((name, name))
            continue
        i = int(m.group(2))
        layers.add(i)
        for r in range(REPEAT):
            plan.append(("%s%d%s" % (m.group(1), REPEAT * i + r, m.group(3)), name))
    if not layers or sorted(layers) != list(range(len(layers))):
        raise SystemExit("make_stacked_model: encoder layers are not numbered 0..n-1: %s" % sorted(layers))
    plan.sort(key=lambda p: natural_key(p[0]))
    return plan, len(layers)


def write_model(src_path, dst_path, header, data_start, plan):
    # Offsets first (F16 = 2 bytes an element), then the header, then the data in that order.
    out_header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for dst_name, src_name in plan:
        shape = header[src_name]["shape"]
        count = 1
        for d in shape:
            count *= d
        out_header[dst_name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + 2 * count]}
        offset += 2 * count
    header_bytes = json.dumps(out_header, separators=(",", ":")).encode("utf-8")
    # safetensors pads the header with spaces so the data starts 8-byte aligned.
    header_bytes += b" " * (-len(header_bytes) % 8)

    digest = hashlib.sha256()
    # src_name -> F16 bytes for the current source layer: its tensors are written for two
    # output layers in a row, so each is converted once and memory holds one layer (~3.5 MB).
    converted = {}
    group = None
    with open(src_path, "rb") as src, open(dst_path, "wb") as dst:

        def emit(b):
            dst.write(b)
            digest.update(b)

        emit(struct.pack("<Q", len(header_bytes)))
        emit(header_bytes)
        for dst_name, src_name in plan:
            m = LAYER_NAME.match(src_name)
            src_group = m.group(1) + m.group(2) if m else src_name
            if src_group != group:
                converted.clear()
                group = src_group
            if src_name not in converted:
                info = header[src_name]
                begin, end = info["data_offsets"]
                src.seek(data_start + begin)
                raw = src.read(end - begin)
                converted[src_name] = f32_to_f16_bytes(raw) if info["dtype"] == "F32" else raw
            emit(converted[src_name])
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src_dir, dst_dir = argv[1], argv[2].rstrip("/")
    started = time.monotonic()
    src_model = os.path.join(src_dir, "model.safetensors")
    header, data_start = read_safetensors_header(src_model)
    plan, src_layers = plan_tensors(header)

    parent = os.path.dirname(os.path.abspath(dst_dir))
    os.makedirs(parent, exist_ok=True)
    # Build beside the destination, so the final rename stays on one file system.
    tmp = tempfile.mkdtemp(prefix=".%s.partial-" % os.path.basename(dst_dir), dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model is not
    try:
        sha = write_model(src_model, os.path.join(tmp, "model.safetensors"), header, data_start, plan)

        with open(os.path.join(src_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config["num_hidden_layers"] = REPEAT * src_layers
        config["_name_or_path"] = os.path.basename(dst_dir)
        # Weights are stored in F16 but meant to be computed in fp32 (as the C engine does);
        # without this, transformers' dtype="auto" would pick float16 from the checkpoint.
        config.pop("dtype", None)
        config["torch_dtype"] = "float32"
        write_json(os.path.join(tmp, "config.json"), config)

        st_config = {}
        st_config_path = os.path.join(src_dir, "config_sentence_transformers.json")
        if os.path.exists(st_config_path):
            with open(st_config_path, encoding="utf-8") as f:
                st_config = json.load(f)
        st_config["prompts"] = PROMPTS
        st_config["default_prompt_name"] = None
        write_json(os.path.join(tmp, "config_sentence_transformers.json"), st_config)

        for name in COPIED_FILES:
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(tmp, name))
        for name in COPIED_DIRS:
            os.mkdir(os.path.join(tmp, name))
            for entry in sorted(os.listdir(os.path.join(src_dir, name))):
                shutil.copyfile(os.path.join(src_dir, name, entry), os.path.join(tmp, name, entry))
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(
                "# %s\n\nA test model made by scripts/make_stacked_model.py from %s: each of its %d\n"
                "encoder layers repeated %d times, weights stored as F16, e5-style prompts.\n"
                "Same shape as e5-small-v2 / bge-small; not a trained model of its own.\n"
                % (os.path.basename(dst_dir), os.path.basename(src_dir.rstrip("/")), src_layers, REPEAT)
            )

        # Swap in atomically: a reader sees the old directory or the complete new one.
        old = None
        if os.path.exists(dst_dir):
            old = tempfile.mkdtemp(prefix=".%s.old-" % os.path.basename(dst_dir), dir=parent)
            os.rmdir(old)
            os.rename(dst_dir, old)
        os.rename(tmp, dst_dir)
        tmp = None
        if old:
            shutil.rmtree(old)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    print("%s  %s" % (sha, os.path.join(dst_dir, "model.safetensors")))
    print(
        "make_stacked_model: %d -> %d layers, F16, %.1f s" % (src_layers, REPEAT * src_layers, time.monotonic() - started),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
