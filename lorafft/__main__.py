"""``python -m lorafft``: the ``lorafft`` command."""

import sys

from lorafft.cli import main

sys.exit(main())
