import sys

from pipeline.cli import run_stage

sys.exit(run_stage("curves"))
