"""The ``specbench`` logger: progress and notices on stderr, one ``specbench: message`` line each.

Modules log to ``logging.getLogger(__name__)``, children of ``specbench``. As transformers does for
its own library logger, ``specbench`` gets a handler of its own when the package is imported: INFO
and above to stderr. So the CLI, the training command, scripts and notebooks all show what users
wait on (a download, a conversion, feature extraction) without configuring logging, and stdout
stays clean for tables and data. It does not propagate to the root logger, where a program's own
set-up would print every line a second time.

`configure` is the one place that changes it: the training command turns on timestamps
(``specbench: [12:34:56] message``) and `log_file` copies the log to a file for a block.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["LOGGER", "configure", "log_file"]

LOGGER = logging.getLogger("specbench")
_DATEFMT = "%H:%M:%S"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (pytest and tools replace it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def _formatter(timestamps: bool) -> logging.Formatter:
    return logging.Formatter("specbench: [%(asctime)s] %(message)s" if timestamps else "specbench: %(message)s",
                             _DATEFMT)


_HANDLER = _Stderr()
_HANDLER.setFormatter(_formatter(False))
LOGGER.addHandler(_HANDLER)
LOGGER.setLevel(logging.INFO)
LOGGER.propagate = False


def configure(*, timestamps: bool = False, level: int = logging.INFO) -> None:
    """Set the stderr format (`timestamps`: the time of each line, for long jobs) and the lowest level shown."""
    _HANDLER.setFormatter(_formatter(timestamps))
    LOGGER.setLevel(level)


@contextmanager
def log_file(path: str | os.PathLike | None) -> Iterator[None]:
    """Inside the block, also append the log to `path` as ``[12:34:56] message`` lines (None: no file)."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", _DATEFMT))
    LOGGER.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        handler.close()
