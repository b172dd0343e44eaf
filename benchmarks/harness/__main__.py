"""python -m benchmarks.harness ... (same as `python -m benchmarks.harness ...`)."""

import sys

from . import main

sys.exit(main())
