"""`python -m qlora.cli serve` whose jobs run tests/cli_with_faults.py instead of qlora.cli.main, so
QLORA_TEST_STEP_DELAY (inherited from the service's environment) makes them slow enough to
cancel or to kill the service mid-job. Nothing else of the service changes."""

import sys

import qlora.service.process
from qlora.cli.main import main

qlora.service.process.CLI_MODULE = "tests.cli_with_faults"

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
