"""``python -m tnjax``: the ``tnjax`` command."""

import sys

from tnjax.cli import main

sys.exit(main())
