"""`python -m fedrun ...` (what torchrun launches: `torchrun ... -m fedrun train ...`)."""

from fedrun.cli import run

run()
