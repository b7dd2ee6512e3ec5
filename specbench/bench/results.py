"""Results files: versioned JSON carrying the environment fingerprint (`specbench.artifacts.environment`),
written atomically (`specbench.artifacts.write_json`); this module holds their kinds and their validation."""

from __future__ import annotations

import json
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
    for key, kind in (("config", dict), ("environment", dict), ("samples", list), ("summary", dict)):
        if key not in data:
            raise ResultsError(f"{path}: missing {key!r}")
        if not isinstance(data[key], kind):
            raise ResultsError(f"{path}: {key!r} is not a JSON {'object' if kind is dict else 'array'}; "
                               "the file is corrupt: re-run to regenerate it")
    return data
