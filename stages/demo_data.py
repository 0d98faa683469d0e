import sys

from pipeline.demo_data import main

sys.exit(main())
