"""``python -m tagdiff.cli``."""

import sys

from .main import main

sys.exit(main())
