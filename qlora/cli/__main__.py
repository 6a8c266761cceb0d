"""`python -m qlora.cli ...`: the `qlora` command (what torchrun and the service launch)."""

import sys

from qlora.cli.main import main

sys.exit(main())
