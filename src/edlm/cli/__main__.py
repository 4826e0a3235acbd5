"""`python -m edlm.cli VERB ...` (what `accelerate launch -m edlm.cli train ...` runs)."""

import sys

from edlm.cli import main

sys.exit(main())
