import sys

from pipeline.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("heads"))
