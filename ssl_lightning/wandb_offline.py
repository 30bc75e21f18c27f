"""Read an offline W&B run (``run-<id>.wandb``) back into Python, without the W&B service.

The file is a LevelDB-style log of protobuf records: a 7-byte header (":W&B", magic 0xBEE1,
version 0), then 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type:
1 full, 2 first, 3 middle, 4 last). Used by the tests and by anyone checking a run on a machine
without network access.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes):
    ident, magic, _ = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"not a W&B offline run file (header {ident!r}, magic {magic:#x})")
    pos, pending = _FILE_HEADER.size, b""
    while pos + _CHUNK_HEADER.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK_HEADER.size:  # block trailer padding
            pos += room
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:
            break  # zero padding at the end of a file still being written
        chunk = data[pos + _CHUNK_HEADER.size: pos + _CHUNK_HEADER.size + length]
        pos += _CHUNK_HEADER.size + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: str | Path, *, wait: float = 30.0) -> dict:
    """{"id", "name", "group", "history": [row dicts], "summary": {key: last value}, "config": {key: value},
    "complete"}.

    W&B's service process may still be writing the file when ``run.finish()`` has returned; a run
    is complete once its exit record is on disk, and this waits up to ``wait`` seconds for it.
    """
    deadline = time.monotonic() + wait
    while True:
        run = _read(run_dir)
        if run["complete"] or time.monotonic() >= deadline:
            return run
        time.sleep(0.2)


def _read(run_dir: str | Path) -> dict:
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}; is this an offline W&B run directory?")
    run = {"id": files[0].stem.removeprefix("run-"), "history": [], "summary": {}, "config": {}, "complete": False,
           "name": None, "group": None}
    for raw in _records(files[0].read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {_item_key(i): json.loads(i.value_json) for i in record.history.item}
            run["history"].append(row)
            run["summary"].update(row)
        elif kind in ("config", "run"):  # the initial config travels inside the run record
            if kind == "run":
                run["name"], run["group"] = record.run.display_name, record.run.run_group
            config = record.config if kind == "config" else record.run.config
            run["config"].update({_item_key(i): json.loads(i.value_json) for i in config.update})
        elif kind == "summary":
            run["summary"].update({_item_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            run["complete"] = True
    return run
