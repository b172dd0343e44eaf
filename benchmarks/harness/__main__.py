"""python -m wan_nabla.bench ... (same as `wan-nabla bench ...`)."""

import sys

from . import main

sys.exit(main())
