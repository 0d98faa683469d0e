import sys

from pipeline.cli import print_settings

sys.exit(print_settings())
