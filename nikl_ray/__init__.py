"""nikl-ray: Ray-distributed tuning and ensembling for Korean text classification.

    import nikl_ray as nr

    run = nr.open_run("my.yaml")            # rows validated, folds, tiny backbones built
    nr.connect(run, local=True)             # Ray on this machine (or join a cluster)
    nr.pipeline(run)                        # or nr.train(run); nr.features(run); nr.ensemble(run)
    predictor = nr.Predictor.load(run.results)
    predictor.predict_text("오늘 영화 너무 좋다")
"""

import importlib
import os

__version__ = "0.2.0"

# Read by Ray when it is imported: the driver then prints workers' lines as they are, where Ray's
# deduplication would fold each run's per-epoch progress lines (alike but for their numbers).
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# name → the module that defines it; imported on first use, so `import nikl_ray` (and `nikl-ray --help`)
# stays light
_PUBLIC = {"open_run": "run", "connect": "run", "Run": "run", "split": "api", "pretrain": "api",
           "tune": "api", "train": "api", "features": "api", "ensemble": "api", "distill": "api",
           "pipeline": "api", "Predictor": "predictor"}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'nikl_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nikl_ray.{_PUBLIC[name]}"), name)


def __dir__():
    return sorted(__all__)
