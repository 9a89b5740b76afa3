"""nikl-ray: Ray-distributed tuning and ensembling for Korean text classification."""

__version__ = "0.1.0"
