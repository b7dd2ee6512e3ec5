"""`python -m specbench.bench.compare ...` (the same as `specbench compare ...`)."""

import sys

from .command import main

sys.exit(main())
