import sys

from pipeline.predict import main

if __name__ == "__main__":
    sys.exit(main())
