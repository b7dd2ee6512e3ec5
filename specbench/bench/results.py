"""Results files: versioned JSON with the full environment fingerprint, written atomically."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from ..errors import SpecbenchError

SCHEMA_VERSION = 1
KIND = "specbench.run"
# Measurements that are not method-vs-vanilla runs (CPU searches, cost curves, kernel timings):
# results/studies/, read by people and the README, skipped by `specbench compare`.
STUDY_KIND = "specbench.study"
STUDY_SCHEMA_VERSION = 1


class ResultsError(SpecbenchError):
    """A results file that cannot be used: corrupt, truncated, foreign or from a newer schema."""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def environment(device) -> dict:
    import torch
    import transformers

    from .. import __version__

    gpu = torch.cuda.get_device_name(device) if getattr(device, "type", str(device)) == "cuda" else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__, "specbench": __version__,
        "git_commit": _git_commit(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
    }


def write_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict:
    """Read and validate a results file; every failure is one ResultsError line naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ResultsError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON (truncated or corrupt at line {e.lineno}); "
                           f"re-run to regenerate it") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise ResultsError(f"{path}: not a specbench results file (missing kind={KIND!r})")
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise ResultsError(f"{path}: schema_version missing")
    if version > SCHEMA_VERSION:
        raise ResultsError(f"{path}: schema version {version} is newer than this specbench reads "
                           f"({SCHEMA_VERSION}); upgrade specbench")
    for key in ("config", "environment", "samples", "summary"):
        if key not in data:
            raise ResultsError(f"{path}: missing {key!r}")
    return data
