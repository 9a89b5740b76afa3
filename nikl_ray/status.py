"""`nikl-ray status`: where a run stands, from another shell while it runs or after it ended.

Per stage: done / running / cut off / pending / failed, from the manifests under the results
root. Per Train run (fold × backbone): its state, epochs, best selection score so far and wall
time — from Ray's dashboard (its Train API, while the Ray instance that runs it is up) and from
the run's own storage (checkpoints, manifests) otherwise, and where it is tracked. Where the
dashboard, the Optuna studies and the trackers are, with the command that opens each.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from pathlib import Path

from nikl_ray.artifacts import read_json
from nikl_ray.config import Experiment
from nikl_ray.layout import Layout
from nikl_ray.members import member_names
from nikl_ray.runfiles import HF_CHECKPOINT, read_history
from nikl_ray.runspec import SELECT_METRIC
from nikl_ray.tracking import IDS, mlflow_uri, track_commands

log = logging.getLogger(__name__)


def record_dashboard(layout: Layout, address: str | None) -> None:
    """Called by commands that run stages: where their Ray dashboard is, for `status` in another shell."""
    from nikl_ray.artifacts import write_json

    if address:
        write_json(layout.dashboard_note, {"address": address, "pid": os.getpid(), "time": time.time()})


def auth_token() -> str | None:
    """Ray's token (token authentication is on by default): RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.exists() else None


def train_runs(address: str, timeout: float = 10) -> list[dict]:
    """Every Train run the dashboard at `address` knows (GET /api/train/v2/runs/v1, with the token)."""
    request = urllib.request.Request(f"{address.rstrip('/')}/api/train/v2/runs/v1")
    token = auth_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())["train_runs"]


def _history(run_dir: Path) -> list[dict]:
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if (p / HF_CHECKPOINT / "trainer_state.json").exists())
    return read_history(checkpoints[-1]) if checkpoints else []


def run_state(run_dir: Path, live: dict | None) -> dict:
    """One Train run: state, epochs, best selection score, wall seconds."""
    history = _history(run_dir)
    scored = [h[SELECT_METRIC] for h in history if SELECT_METRIC in h]
    epochs = max((int(round(h.get("epoch", 0))) for h in history if "loss" in h), default=0)
    out = {"epochs": epochs, "best_score": max(scored) if scored else None, "wall_seconds": None, "live": None,
           "tracking": tracked(run_dir)}
    if live:
        out["live"] = live["status"]
        start, end = live.get("start_time_ns"), live.get("end_time_ns")
        out["wall_seconds"] = ((end or time.time_ns()) - start) / 1e9 if start else None
    manifest = Layout.manifest(run_dir)
    if manifest.exists():
        m = read_json(manifest)
        out.update(state="done", wall_seconds=m.get("wall_seconds"), best_score=m.get("selection_score"),
                   epochs=m.get("epochs_run"), degenerate=m.get("degenerate"))
    elif (run_dir / "failed.json").exists() or (live and live["status"] in ("ERRORED", "ABORTED")):
        error = read_json(run_dir / "failed.json")["error"] if (run_dir / "failed.json").exists() else live["status"]
        out.update(state="failed", error=error)
    elif live and live["status"] in ("INITIALIZING", "SCHEDULING", "RUNNING", "RESTARTING", "RESIZING"):
        out["state"] = "running"
    elif run_dir.exists():
        out["state"] = "cut off"
    else:
        out["state"] = "pending"
    return out


def tracked(run_dir: Path) -> dict:
    """Where one run is tracked: its TensorBoard events, W&B run folders, MLflow run id (tracking.py)."""
    ids = read_json(run_dir / IDS) if (run_dir / IDS).exists() else {}
    return {"tensorboard": str(run_dir / "tensorboard") if (run_dir / "tensorboard").exists() else None,
            "wandb": [str(p) for p in sorted(run_dir.glob("wandb/offline-run-*"))], "mlflow_run_id": ids.get("mlflow"),
            "wandb_run_id": ids.get("wandb")}


def _stage_state(parts: list[str]) -> str:
    if not parts:
        return "pending"
    if "failed" in parts:
        return "failed"
    if all(p == "done" for p in parts):
        return "done"
    if "running" in parts:
        return "running"
    if any(p in ("done", "cut off") for p in parts):
        return "cut off"
    return "pending"


def run_status(exp: Experiment, *, ray_address: str | None = None) -> dict:
    """Everything `nikl-ray status` says, as a dict (what `--json` prints)."""
    layout = exp.layout
    note = layout.dashboard_note
    address = ray_address or (read_json(note)["address"] if note.exists() else None)
    live, problem = {}, None
    if address:
        try:
            live = {r["name"]: r for r in reversed(train_runs(address))}  # newest last: it wins
        except Exception as e:  # noqa: BLE001 - Ray down: the storage still tells
            problem = f"{type(e).__name__}: {e}"
    k = exp.folds.k
    runs = {layout.run_name(b.name, f): run_state(layout.pair(b.name, f), live.get(layout.run_name(b.name, f)))
            for b in exp.backbones for f in range(k)}
    students = layout.distill / "runs"  # a distilled student's Train runs (stages/distill.py), when there are any
    runs.update({d.name: run_state(d, live.get(d.name)) for d in sorted(students.iterdir()) if d.is_dir()}
                if students.exists() else {})
    searches = {}
    for name in exp.search_spaces:
        d = layout.tune(name)
        trials = [r for n, r in live.items() if n.startswith(f"{name}-") and "-fold" not in n]
        running = any(r["status"] in ("INITIALIZING", "SCHEDULING", "RUNNING") for r in trials)
        searches[name] = {"state": "done" if layout.manifest(d).exists() else "running" if running
                          else "cut off" if d.exists() else "pending",
                          "trials_seen": len(list(layout.search(name).glob("trial_*"))) if d.exists() else 0,
                          "optuna_study": str(layout.optuna_db(name)), "tensorboard_logdir": str(layout.tune(name))}
    features = {f"{m}-fold{f}": "done" if layout.manifest(layout.features(m, f)).exists() else "pending"
                for m in member_names(exp) for f in range(k)}
    pretrain = {b.name: "done" if layout.manifest(layout.pretrain(b.name)).exists() else
                "cut off" if layout.pretrain(b.name).exists() else "pending" for b in exp.backbones if b.pretrain}
    by_stage = {
        "split": "done" if layout.manifest(layout.split).exists() else "pending",
        "pretrain": _stage_state(list(pretrain.values())) if pretrain else "not configured",
        "tune": _stage_state([s["state"] for s in searches.values()]) if searches else "not configured",
        "train": _stage_state([r["state"] for r in runs.values()]),
        "features": _stage_state(list(features.values())) if any(v == "done" for v in features.values()) else "pending",
        "ensemble": "done" if layout.manifest(layout.ensemble).exists() else "pending",
        "distill": "done" if layout.manifest(layout.distill).exists() else "cut off" if students.exists() else "not run",
    }
    stages = {name: by_stage[name] for name in layout.stages()}  # in pipeline order
    submission = next((str(p) for p in layout.ensemble.glob("submission.*")), None) if layout.ensemble.exists() else None
    tracking = {"trackers": exp.tracking.trackers, "mlflow_uri": mlflow_uri(exp), "commands": track_commands(exp)}
    return {"results": str(layout.root), "stages": stages, "runs": runs, "searches": searches, "features": features,
            "tracking": tracking,
            "dashboard": address, "dashboard_problem": problem, "submission": submission,
            "failed": [n for n, r in runs.items() if r["state"] == "failed"] + [
                s for s, v in stages.items() if v == "failed" and s != "train"]}


def print_status(status: dict, *, as_json: bool = False) -> None:
    from nikl_ray.tables import markdown

    if as_json:
        print(json.dumps(status, indent=2, ensure_ascii=False))
        return
    print(f"results: {status['results']}")
    print("stages: " + ", ".join(f"{k} {v}" for k, v in status["stages"].items()))
    rows = [{"run": n, "state": r["state"] + (f" ({r['live']})" if r["live"] and r["state"] != "done" else ""),
             "epochs": r["epochs"], "best selection score": r["best_score"],
             "wall seconds": None if r["wall_seconds"] is None else round(r["wall_seconds"], 1),
             "note": r.get("error") or ("DEGENERATE" if r.get("degenerate") else "")} for n, r in status["runs"].items()]
    print(markdown(rows), end="")
    for name, s in status["searches"].items():
        print(f"search {name}: {s['state']}, {s['trials_seen']} trial(s); Optuna study {s['optuna_study']} "
              f"(optuna-dashboard sqlite:///{s['optuna_study']}); tensorboard --logdir {s['tensorboard_logdir']}")
    for line in status["tracking"]["commands"]:
        print(f"tracking: {line}")
    if status["dashboard"]:
        print(f"Ray dashboard: {status['dashboard']}" + (f" (not answering: {status['dashboard_problem']})"
                                                         if status["dashboard_problem"] else ""))
    if status["submission"]:
        print(f"submission: {status['submission']}")
    if status["failed"]:
        print(f"FAILED: {', '.join(status['failed'])}")
