"""nikl-ray: Ray-distributed tuning and ensembling for Korean text classification."""

import os

__version__ = "0.2.0"

# Read by Ray when it is imported: the driver then prints workers' lines as they are, where Ray's
# deduplication would fold each run's per-epoch progress lines (alike but for their numbers).
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
