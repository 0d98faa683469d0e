import sys

from pipeline.predict import main

sys.exit(main())
