import sys

from pipeline.cli import print_settings

if __name__ == "__main__":
    sys.exit(print_settings())
