"""``python -m repro.study``: run a profile of the study (see the package docstring)."""
import sys

from repro.study import main

sys.exit(main())
