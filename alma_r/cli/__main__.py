"""`python -m alma_r.cli ...` (what `accelerate launch -m alma_r.cli train ...` runs): the same as `alma-r`."""

import sys

from alma_r.cli import main

sys.exit(main())
