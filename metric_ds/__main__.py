"""``python -m metric_ds ...`` is ``metric-ds ...``."""
import sys

from metric_ds.cli import main

sys.exit(main())
