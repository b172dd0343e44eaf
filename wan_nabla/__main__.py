"""`python -m wan_nabla ...` is `wan-nabla ...` (the form torchrun launches)."""

import sys

from .cli import main

sys.exit(main())
