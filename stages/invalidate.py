import sys

from pipeline.cli import run_invalidate

sys.exit(run_invalidate())
