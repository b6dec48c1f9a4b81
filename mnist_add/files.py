"""What a path a user gave names, and its text read without ever blocking on it.

A config, a checkpoint, a summary or an index can be anything by mistake: a folder, a FIFO (whose open waits for a
writer forever), a device (/dev/zero never ends), a link to nothing, bytes that are not text. Each tool says which
in one line instead of hanging or blaming the wrong thing. Standard library only: a command line can check its
paths before torch's imports.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class UnreadableFile(ValueError):
    """A file that is there but cannot be read as text or JSON; the message names it and why."""


def present(path: Path) -> bool:
    """Whether anything stands at `path`, a link to nothing included (Path.exists follows the link and says no)."""
    return os.path.lexists(path)


def kind_of(path: Path) -> str | None:
    """What stands at `path` when it is not a regular file, in words (links followed); None for a regular file or
    for nothing at all."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return f"a dangling link (to {os.readlink(path)})" if os.path.islink(path) else None
    return next((name for is_kind, name in _KINDS if is_kind(mode)), None)


def read_text(path: Path) -> str:
    """The UTF-8 text of the regular file at `path`, or UnreadableFile naming it."""
    data = read_bytes(path)
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise UnreadableFile(f"{path} is not text (byte {err.start} is not UTF-8)") from None


def read_bytes(path: Path) -> bytes:
    """The bytes of the regular file at `path`, or UnreadableFile naming it. Opened without blocking and checked
    before a byte is read, so that a FIFO or a device is refused, not waited on or read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise UnreadableFile(f"{path} {_why(path, err)}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnreadableFile(f"{path} is {kind_of(path) or 'not a regular file'}, not a file")
        with open(fd, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    """The JSON value in the regular file at `path`, or UnreadableFile naming it."""
    try:
        return json.loads(read_text(path))
    except UnreadableFile:
        raise
    except (ValueError, RecursionError) as err:  # not JSON, a number past Python's digit limit, nested too deep
        raise UnreadableFile(f"{path} is not valid JSON ({str(err).split(';')[0]})") from None


def _why(path: Path, err: OSError) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        return f"is {kind_of(path)}"
    return "does not exist" if isinstance(err, FileNotFoundError) else f"cannot be read: {err.strerror}"
