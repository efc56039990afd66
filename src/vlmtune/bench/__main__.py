"""``python -m vlmtune.bench``: the same as ``vlmtune bench``."""

import sys

from vlmtune.bench.command import main

sys.exit(main())
