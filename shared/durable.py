"""Writes that survive a crash, and one run per output folder.

- `write_json`: a temporary file in the same folder, flushed and fsync-ed, renamed over the target,
  then the folder fsync-ed: a reader sees the old file or the new one, never half of one.
- `fsync_dir`: make a rename in a folder durable.
- `run_lock`: an exclusive flock on `OUT/.fedcondense.lock` for the whole run; a second run on the same
  folder stops at once with an error that names the holder. The kernel drops the lock when its holder
  exits, crashed or not.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

try:
    import fcntl
except ImportError:                 # not POSIX: no lock, the writes stay atomic
    fcntl = None


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj, **dump_kwargs) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, **dump_kwargs)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


class FolderInUse(RuntimeError):
    pass


@contextlib.contextmanager
def run_lock(out: Path):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(out / ".fedcondense.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise FolderInUse(f"{out} is in use by {holder}: two runs in one output folder would corrupt each "
                              f"other's pool and report; wait for it, or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
