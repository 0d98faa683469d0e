import sys

from pipeline.cli import run_invalidate

if __name__ == "__main__":
    sys.exit(run_invalidate())
