"""``python -m vpnd_runtime``: the same as the ``vpnd`` command."""

import sys

from vpnd_runtime.cli import main

sys.exit(main())
