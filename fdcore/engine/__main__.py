"""``python -m fdcore.engine``: the same as ``fdcore engine``."""

import sys

from fdcore.engine.cli import main

sys.exit(main())
