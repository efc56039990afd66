"""``python -m vlmtune``: the same commands as the ``vlmtune`` script (launchers such as torchrun need it)."""

import sys

from vlmtune.cli import main

sys.exit(main())
