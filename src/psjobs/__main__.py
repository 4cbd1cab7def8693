"""``python -m psjobs``: the psjobs command."""

import sys

from ._cli import main

sys.exit(main())
