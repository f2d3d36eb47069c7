import sys

from fewchips.cli import main

sys.exit(main())
