"""specbench: reproducibility benchmarks for lossless speculative decoding."""

from . import logs as _logs  # noqa: F401 - gives the "specbench" logger its stderr handler

__version__ = "0.1.0"
