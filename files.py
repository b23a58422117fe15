"""Files a run writes and reads: every file this project writes goes through atomic_write, so a reader (or a
rerun after a kill or a full disk) sees the old file or the new one, never half of one; JSON run files are read
with read_json, which names the file and the fix. ProxyAlError is the project's error: its message names the
file or option at fault and what to do, and only the entry points (al_loop.main) turn it into an exit.
"""
import json
import os
import re
import tempfile
import zlib
from pathlib import Path

import numpy as np


class ProxyAlError(ValueError):
    """A problem a user can fix; the message names the file or option and what to do."""


TMP_SUFFIX = ".proxy-al.tmp"    # atomic_write's temporary files: .<name>.<8 random characters>.proxy-al.tmp
OWN_TMP = re.compile(r"\..+\.[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX))


def atomic_write(path, write_fn) -> Path:
    """Call write_fn(f) on an open binary file next to `path`, flush it to disk, then move it onto `path`
    in one step. The temporary file's name matches OWN_TMP, so a rerun deletes only its own. Returns the Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; others sharing a data or cache folder must read them
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically. Returns the Path."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path, obj) -> Path:
    """Write `obj` as indented JSON to `path` atomically. Returns the Path."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def atomic_save_npy(path, array: np.ndarray) -> Path:
    """Save `array` as .npy to `path` atomically. Returns the Path."""
    return atomic_write(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def read_json(path, problem_of, fix):
    """A JSON file's object, or ProxyAlError naming the file, what is wrong (not JSON, or problem_of(obj)) and
    the fix."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        problem = problem_of(obj)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"not valid JSON ({e})"
    except OSError as e:
        problem = f"cannot be read ({e.strerror})"
    if problem:
        raise ProxyAlError(f"{path}: {problem}; {fix}")
    return obj


def fingerprint(path, chunk=65536) -> list:
    """[size in bytes, CRC-32 of the file's first and last `chunk` bytes]: cheap (two reads, whatever the size)
    and the same for a copy or a moved file, different for another scan or label almost surely."""
    with open(path, "rb") as f:
        head = f.read(chunk)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - chunk, len(head)))
        return [size, zlib.crc32(f.read(), zlib.crc32(head))]


def few(names, n=5):
    """'a, b, c and 4 more' for messages."""
    names = sorted(str(x) for x in names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
