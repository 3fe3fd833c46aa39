import sys

from lorafft.cli import main

sys.exit(main())
