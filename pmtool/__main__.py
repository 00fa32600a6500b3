import sys

from pmtool.cli import main

sys.exit(main())
