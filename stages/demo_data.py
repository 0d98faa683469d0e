import sys

from pipeline.demo_data import main

if __name__ == "__main__":
    sys.exit(main())
