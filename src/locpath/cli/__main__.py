"""`python -m locpath.cli`."""

import sys

from . import main

sys.exit(main())
