import sys

from fastingest.cli import main

sys.exit(main())
