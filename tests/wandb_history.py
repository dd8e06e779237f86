"""Read the history of an offline W&B run from its `run-*.wandb` file.

The file is W&B's transaction log: a 7-byte header (":W&B", magic, version) followed by
LevelDB-log framing (32 KiB blocks; each chunk = crc32 (4) + length (2, LE) + type (1:
full, 2: first, 3: middle, 4: last)) around serialized `wandb.proto.wandb_internal_pb2.Record`
messages. We decode the records with wandb's own protobuf classes.
"""
import glob
import json
import os
import struct

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7


def records(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER: pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            pending = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        elif kind == 4:
            pending += chunk
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(pending)
        pending = b""
        yield rec


def history(run_dir):
    """[{key: value, '_step': n}, ...] of an offline run directory (or its parent wandb/ dir)."""
    files = [f for f in glob.glob(os.path.join(run_dir, "**", "run-*.wandb"), recursive=True) if "latest-run" not in f]
    assert len(files) == 1, f"expected one .wandb file under {run_dir}, found {files}"
    rows = []
    for rec in records(files[0]):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows
