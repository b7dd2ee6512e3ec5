"""What every part of `specbench compare` shares: its error, the metrics, the file kinds it reads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ...errors import SpecbenchError
from .. import results as _results

METRICS = ("tau", "speedup", "tokens_per_s")
METRIC_LABEL = {"tau": "tau", "speedup": "speedup", "tokens_per_s": "tokens/s"}
VERDICTS = ("pass", "regress", "improve", "not comparable")

REFERENCE_KIND = "specbench.reference"
CLAIMS_KIND = "specbench.claims"
REFERENCE_SCHEMA = 1


class CompareError(SpecbenchError):
    """Unusable compare input (the CLI prints it as one line and exits 2)."""


def machine_label(env: dict) -> str | None:
    """The machine a record ran on: its GPU, else its CPU name with the vector ISA where recorded
    ("AMD EPYC (AVX512)"); one CPU name covers VMs whose timings differ."""
    if env.get("gpu"):
        return env["gpu"]
    cpu = env.get("cpu")
    return f"{cpu} ({env['cpu_isa']})" if cpu and env.get("cpu_isa") else cpu


def one_line(msg: object) -> str:
    """A message on one line (exception texts may span several; the CLI and skip reasons print one)."""
    return " ".join(str(msg).split())


def is_num(v: Any) -> bool:
    """A finite int or float (not a bool): what a metric value must be to be compared."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def normalized(obj: Any) -> Any:
    """`obj` as JSON would give it back (tuples -> lists, keys sorted), so recorded and live values compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def read_json(path: Path) -> Any:
    """A JSON file's content; an unreadable, corrupt or truncated file is one CompareError/ResultsError line."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CompareError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        _results.load(Path(path))  # raises the project's one-line "truncated or corrupt" error
        raise  # pragma: no cover
