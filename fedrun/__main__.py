"""`python -m fedrun ...` (what torchrun launches: `torchrun ... -m fedrun train ...`)."""

import sys

from fedrun.cli import main

sys.exit(main())
