import sys

from pipeline.cli import run_all

sys.exit(run_all())
