"""`python -m bench.report RESULTS_DIR [--out DIR] [--baseline METHOD/IMPL]`."""

import sys

from bench.report.build import main

sys.exit(main())
