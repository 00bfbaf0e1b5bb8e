"""``python -m federation.cli``: the ``outpost`` command."""

import sys

from federation.cli.main import main

sys.exit(main())
