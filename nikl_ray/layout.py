"""Where every artifact of a run lives: the one place that builds a results path.

    <results>/
      experiment.json   the experiment the run was last opened with (`--results DIR` alone reopens it)
      split/            folds.json (held-out and selection ids per fold) + manifest
      tiny_backbones/   tiny random-init checkpoints built for `tiny:<kind>` backbones
      pretrain/<backbone>/        its pretraining run, `model/` (the checkpoint later stages use), report
      tune/<backbone>/  the Tune search, optuna.db, leaderboard, best_config.yaml, manifest
      train/<backbone>-fold<k>/   one Ray Train run: checkpoints, manifest (Ray's run name), features/ it made
      train/summary.{csv,md}
      features/<member>/fold<k>/  out-of-fold and test features of one fold model (a generate task's: its
                        answers, oof_answers.json / test_answers.json), manifest
      ensemble/         heads, report, decision.json, run.json (the run as trained: what Predictor.load reads),
                        submission, submissions/<candidate>.* (and submissions/<routed|bagged>/<candidate>.*:
                        test rows answered the way not submitted); a generate task's answers.* and qa_items.json
      distill/          the student distilled from the ensemble: runs/ (cross-fitted and served), student.json,
                        report, oof.npy, pool/ (the pool as the run labelled it), export/ (onnx, int8)
      selection/        rows `nikl-ray select` picked for labelling
      tracking/         mlflow.db and mlflow-artifacts/ (MLflow's default store; tracking.py); TensorBoard
                        events and W&B run folders live in each run's own folder
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nikl_ray.artifacts import MANIFEST


@dataclass(frozen=True)
class Layout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @staticmethod
    def manifest(stage_dir: Path) -> Path:
        """The manifest a stage (or one of its runs) writes last, in `stage_dir`."""
        return Path(stage_dir) / MANIFEST

    @property
    def experiment(self) -> Path:
        """The experiment the run was last opened with (what `--results DIR` alone reopens)."""
        return self.root / "experiment.json"

    # split
    @property
    def split(self) -> Path:
        return self.root / "split"

    @property
    def folds(self) -> Path:
        return self.split / "folds.json"

    # tiny backbones
    def tiny(self, kind: str) -> Path:
        return self.root / "tiny_backbones" / kind

    # pretrain
    def pretrain(self, backbone: str) -> Path:
        return self.root / "pretrain" / backbone

    def pretrain_report(self, backbone: str) -> Path:
        return self.pretrain(backbone) / "report.md"

    def pretrained(self, backbone: str) -> Path:
        """The pretrained checkpoint later stages start from."""
        return self.pretrain(backbone) / "model"

    # tune
    def tune(self, backbone: str) -> Path:
        return self.root / "tune" / backbone

    def best_config(self, backbone: str) -> Path:
        return self.tune(backbone) / "best_config.yaml"

    def search(self, backbone: str) -> Path:
        """Ray Tune's experiment (its trials, their TensorBoard event files)."""
        return self.tune(backbone) / "search"

    def search_inputs(self, backbone: str) -> Path:
        """What the search was started with (a cut-off search resumes only for the same)."""
        return self.tune(backbone) / "search_inputs.json"

    def search_runs(self, backbone: str) -> Path:
        """Ray Train's storage for the trials' runs."""
        return self.tune(backbone) / "train_runs"

    def finished_trials(self, backbone: str) -> Path:
        """One marker per trial that ended by itself (not stopped by ASHA)."""
        return self.tune(backbone) / "finished_trials"

    def optuna_db(self, backbone: str) -> Path:
        return self.tune(backbone) / "optuna.db"

    def leaderboard(self, backbone: str) -> Path:
        return self.tune(backbone) / "leaderboard.csv"

    # train
    @property
    def train(self) -> Path:
        return self.root / "train"

    @staticmethod
    def run_name(backbone: str, fold: int) -> str:
        """Ray Train's name for a fold run (what the dashboard lists)."""
        return f"{backbone}-fold{fold}"

    def pair(self, backbone: str, fold: int) -> Path:
        return self.train / self.run_name(backbone, fold)

    def run_features(self, backbone: str, fold: int) -> Path:
        """The features a fold's final run wrote from its model (the features stage takes them)."""
        return self.pair(backbone, fold) / "features"

    @property
    def train_summary(self) -> Path:
        return self.train / "summary.csv"

    # features
    @property
    def features_root(self) -> Path:
        return self.root / "features"

    def features(self, member: str, fold: int) -> Path:
        return self.features_root / member / f"fold{fold}"

    # ensemble
    @property
    def ensemble(self) -> Path:
        return self.root / "ensemble"

    @property
    def heads(self) -> Path:
        return self.ensemble / "heads"

    @property
    def report(self) -> Path:
        return self.ensemble / "report.md"

    @property
    def ensemble_oof(self) -> Path:
        """Every candidate's out-of-fold probabilities (`<candidate>.npy`) and their rows (`rows.json`:
        ids, inner folds): what a distilled student learns from and is compared with."""
        return self.ensemble / "oof"

    # distill
    @property
    def distill(self) -> Path:
        """The run's distilled student: its Ray Train runs (`runs/`), record, report, CPU forms."""
        return self.root / "distill"

    @property
    def student_record(self) -> Path:
        """What Predictor.load(student=…) reads: the student's backbone, checkpoint, rule, forms."""
        return self.distill / "student.json"

    @property
    def student_report(self) -> Path:
        return self.distill / "report.md"

    @property
    def student_export(self) -> Path:
        return self.distill / "export"

    @property
    def decision(self) -> Path:
        return self.ensemble / "decision.json"

    @property
    def record(self) -> Path:
        """The run as trained (task, resolved backbones, every candidate's rule): what Predictor.load reads."""
        return self.ensemble / "run.json"

    @property
    def repeated_words(self) -> Path:
        """The words the training text has more than once (what `select` scores rarity against)."""
        return self.ensemble / "repeated_words.json"

    @property
    def report_json(self) -> Path:
        return self.ensemble / "report.json"

    @property
    def report_plot(self) -> Path:
        return self.ensemble / "report.png"

    def submission(self, suffix: str) -> Path:
        return self.ensemble / f"submission{suffix}"

    def answers_submission(self, suffix: str) -> Path:
        """A generate task's submitted answers as text (`submission` holds their vectors where the task asks)."""
        return self.ensemble / f"answers{suffix}"

    @property
    def qa_items(self) -> Path:
        """A generate task's training items as retrieval reads them (questions, references)."""
        return self.ensemble / "qa_items.json"

    def candidate_submission(self, name: str, suffix: str, test_rows: str | None = None) -> Path:
        """A candidate's test predictions; `test_rows`: answered the way the run does not submit."""
        return self.ensemble / "submissions" / (test_rows or "") / f"{name}{suffix}"

    @property
    def explanation(self) -> Path:
        """`nikl-ray explain`'s shaded text."""
        return self.ensemble / "explain.html"

    def selection(self, name: str) -> Path:
        """Rows `nikl-ray select` picked for labelling."""
        return self.root / "selection" / name

    # tracking (nikl_ray/tracking.py)
    @property
    def mlflow_db(self) -> Path:
        return self.root / "tracking" / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "tracking" / "mlflow-artifacts"

    @property
    def ensemble_run(self) -> Path:
        """The ensemble stage's tracked run (its TensorBoard events, W&B folder, tracking ids)."""
        return self.ensemble / "run"

    @property
    def dashboard_note(self) -> Path:
        """Where the last command that ran stages found its Ray dashboard (for `status` in another shell)."""
        return self.root / "ray_dashboard.json"

    def stages(self) -> dict[str, Path]:
        """Each stage's folder that holds (or whose children hold) its manifests, in pipeline order."""
        return {"split": self.split, "pretrain": self.root / "pretrain", "tune": self.root / "tune", "train": self.train,
                "features": self.features_root, "ensemble": self.ensemble, "distill": self.distill}
