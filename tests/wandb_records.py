"""Read what a W&B run logged from its offline `.wandb` file: wandb's own protobuf records.

wandb 0.31 ships no reader, so this walks the file's LevelDB-log framing (32 KiB blocks, a 7-byte
':W&B' header) and decodes each `wandb_internal_pb2.Record`.
"""

import time
from pathlib import Path

import json, struct, zlib
from wandb.proto import wandb_internal_pb2 as pb

_BLOCK, _HDR = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_CRC = {t: zlib.crc32(bytes([t])) for t in (1, 2, 3, 4)}

def iter_wandb_records(path):
    """Yield wandb_internal_pb2.Record from a .wandb file (LevelDB-log framing,
    32 KiB blocks, 7-byte ':W&B' file header). Stops quietly at a truncated tail."""
    with open(path, "rb") as f:
        data = f.read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a .wandb file")
    pos, buf = 7, b""
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _HDR:                      # zero-padded block trailer
            pos += left
            continue
        if pos + _HDR > len(data):
            return
        crc, length, rtype = struct.unpack("<IHB", data[pos:pos + _HDR])
        if rtype == 0 and length == 0:        # zero fill / preallocated tail
            if crc == 0: pos += left; continue
        payload = data[pos + _HDR: pos + _HDR + length]
        if len(payload) < length:             # record still being written
            return
        if zlib.crc32(payload, _CRC.get(rtype, 0)) != crc:
            raise ValueError(f"{path}: bad checksum at offset {pos}")
        pos += _HDR + length
        if rtype == _FULL:
            buf = payload
        elif rtype == _FIRST:
            buf = payload; continue
        elif rtype == _MIDDLE:
            buf += payload; continue
        elif rtype == _LAST:
            buf += payload
        else:
            raise ValueError(f"{path}: bad record type {rtype} at {pos}")
        rec = pb.Record()
        rec.ParseFromString(buf)
        yield rec

def _item_path(it):
    # 0.31 writes nested_key (list of path parts); older files use key
    return list(it.nested_key) if it.nested_key else [it.key]

def _put(d, path, value):
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = value

def _history_value(it):
    kind = it.WhichOneof("value")          # 0.31 typed values, else value_json
    if kind is None:
        return json.loads(it.value_json) if it.value_json else None
    if kind == "none": return None
    if kind == "json": return json.loads(it.json)
    return getattr(it, kind)

def read_wandb_file(path):
    out = dict(run_id=None, project=None, config={}, history=[], summary={},
               exit_code=None, complete=False)
    for rec in iter_wandb_records(path):
        t = rec.WhichOneof("record_type")
        if t == "run":
            out["run_id"], out["project"] = rec.run.run_id, rec.run.project
            for it in rec.run.config.update:
                _put(out["config"], _item_path(it), json.loads(it.value_json))
        elif t == "config":
            for it in rec.config.update:
                _put(out["config"], _item_path(it), json.loads(it.value_json))
            for it in rec.config.remove:
                out["config"].pop(_item_path(it)[0], None)
        elif t == "history":
            row = {}
            for it in rec.history.item:
                _put(row, _item_path(it), _history_value(it))
            out["history"].append(row)
        elif t == "summary":
            for it in rec.summary.update:
                _put(out["summary"], _item_path(it), json.loads(it.value_json))
        elif t == "exit":                  # written by finish(); last record in 0.31
            out["exit_code"] = rec.exit.exit_code
            out["complete"] = True
    out["config"].pop("_wandb", None)
    return out

def wait_for_wandb_file(path, timeout=30.0, interval=0.02):
    """finish() can return before wandb-core has flushed the .wandb file.
    Poll (bounded) until the exit record is present; return the parsed dict."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = read_wandb_file(path)
            if r["complete"]:
                return r
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout}s")
        time.sleep(interval)


def offline_runs(wandb_dir: Path) -> list[dict]:
    """Every complete offline segment under `wandb_dir`, oldest first."""
    return [wait_for_wandb_file(path) for path in sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))]
