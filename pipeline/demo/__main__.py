import sys

from pipeline.demo.run import main

sys.exit(main())
