"""How specbench writes what it records: atomically, with content hashes and with stamps.

- Durable writes: `atomic_path` (write a file by any means, then it replaces the target in one
  rename), `write_text`, `write_json`. A reader sees the old file or the new one, never a part
  of one, and an interrupted write leaves the old file in place.
- Content hashes: sha256 of bytes, of canonical JSON, of a file, of a set of files (as
  ``sha256sum`` lists them), and `stamped_sha256`, a file's hash remembered in a stamp file
  while the file's size and mtime are unchanged (large weights are hashed once).
- Stamps: the UTC time, the git commit of this checkout, the CPU name and `environment`, the
  one fingerprint that results files, studies and training manifests carry.

Standard library only at import time (torch and transformers are read inside `environment`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "check_writable",
    "cpu_name",
    "environment",
    "git_commit",
    "read_stamp",
    "sha256_bytes",
    "sha256_file",
    "sha256_files",
    "sha256_json",
    "stamp_path",
    "stamped_sha256",
    "utc_now",
    "write_json",
    "write_stamp",
    "write_text",
]


# ---------------------------------------------------------------- durable writes


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path`: what the block writes there replaces `path` when it ends.

    The block creates the file by any means (``open``, ``torch.save``, safetensors); on success it is
    flushed to disk and renamed over `path`; on an exception it is removed and `path` is untouched.
    The parent directory is created if needed. The temporary file is created by the writer itself
    (not by ``mkstemp``, which makes 0600 files), so it gets the usual permissions: 0o666 minus the
    umask, readable by others under the common umasks, as results files are meant to be shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # hidden, unique, and with `path`'s suffix (matplotlib's savefig picks the format by it)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: str | os.PathLike, option: str, *, directory: bool = False) -> None:
    """Make `path`'s directory (or `path` itself, for an output directory) and prove a file can be written
    there, before any work whose result would be lost; a UsageError naming `option` otherwise."""
    import tempfile

    from .errors import UsageError

    path = Path(path)
    if not directory and path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    where = path if directory else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write in {where} ({e.strerror or e}); choose another path") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 1) -> None:
    """Write `data` as JSON (with a final newline) to `path` atomically."""
    write_text(path, json.dumps(data, indent=indent) + "\n")


# ---------------------------------------------------------------- content hashes


def display_path(path: str | os.PathLike) -> str:
    """`path` relative to the working directory when it lies below it, else as given: what a user would
    type, and no machine's home directory in a file that is committed."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of `obj` as JSON with sorted keys: a stable key of a settings dict."""
    return sha256_bytes(json.dumps(obj, sort_keys=True).encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(files: Iterable[Path], file_sha256: Callable[[Path], str] = sha256_file) -> str:
    """sha256 over the lines ``"<sha256>  <name>\\n"`` of `files` in name order (what ``sha256sum`` prints).

    One hash for a set of files (a model's weight shards); `file_sha256` may take a file's hash from
    somewhere cheaper than reading it (a stamp, a content-addressed file name).
    """
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f"{file_sha256(f)}  {f.name}\n".encode())
    return h.hexdigest()


def stamp_path(path: Path) -> Path:
    """Where `path`'s hash is remembered by default: ``<path>.sha256``."""
    return path.with_name(path.name + ".sha256")


def write_stamp(path: Path, sha256: str, stamp: Path | None = None) -> None:
    """Record that `path` (as it is now) has hash `sha256` in `stamp` (default ``<path>.sha256``).

    Best effort: a read-only cache just skips it.
    """
    st = path.stat()
    try:
        write_json(stamp or stamp_path(path), {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
                   indent=None)
    except OSError:
        pass


def read_stamp(stamp: Path) -> dict | None:
    try:
        data = json.loads(stamp.read_text())
        return data if isinstance(data, dict) and isinstance(data.get("sha256"), str) else None
    except (OSError, ValueError):
        return None


def stamped_sha256(path: Path, stamp: Path | None = None) -> str:
    """sha256 of `path`, taken from its stamp while size and mtime are unchanged, else recomputed (and stamped)."""
    stamp = stamp or stamp_path(path)
    st = path.stat()
    data = read_stamp(stamp)
    if data and data.get("size") == st.st_size and data.get("mtime_ns") == st.st_mtime_ns:
        return data["sha256"]
    sha = sha256_file(path)
    write_stamp(path, sha, stamp)
    return sha


# ---------------------------------------------------------------- stamps


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-11-24T03:08:01+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the specbench checkout this code runs from, ``-dirty`` if tracked files are modified;
    None outside a git checkout (an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    try:
        # An installed copy may sit inside some other repository (a venv in a user's project): only a
        # repository whose top level is this package's parent is specbench's own checkout.
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if not top or Path(top).resolve() != root:
            return None
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    """The environment fingerprint: date, versions, git commit, CPU/GPU, threads (`device`: where it ran)."""
    import torch
    import transformers

    from . import __version__

    gpu = torch.cuda.get_device_name(device) if getattr(device, "type", str(device)).startswith("cuda") else None
    return {
        "date": utc_now(),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__, "specbench": __version__,
        "git_commit": git_commit(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        # the vector ISA torch dispatches to: VMs sold under one CPU name differ in it (AVX2 vs AVX512),
        # and the fast runtime's kernel choice and every CPU timing depend on it
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "fast_kernel_plan": fast_kernel_plan(),
    }


def fast_kernel_plan() -> str | None:
    """The fast runtime's kernel plan where this process made one (SPECBENCH_FAST_KERNELS repeats it), else
    None. Looked up, not imported: the fingerprint must not load the models package or start a calibration."""
    runtime = sys.modules.get("specbench.models.fast_runtime")
    plan = getattr(runtime, "_plan", None)
    return runtime.plan_text(plan) if plan else None
