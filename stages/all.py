import sys

from pipeline.cli import run_all

if __name__ == "__main__":
    sys.exit(run_all())
