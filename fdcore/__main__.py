"""``python -m fdcore`` is the ``fdcore`` command."""

import sys

from fdcore.cli import main

sys.exit(main())
