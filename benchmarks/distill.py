"""The full ensemble against its distilled student (fp32, int8, ONNX) on the real NIKL data, 2 CPU cores.

    python benchmarks/distill.py                       # reads ../shared/data/nikl_ea_2023
    python benchmarks/distill.py --results results/distill-bench --folds 3 --student neox-tiny

1. The run of `benchmarks/nikl_cpu.py --holdout-dev` (train.jsonl learns, dev.jsonl is never seen:
   its labels score everything below), made here or reused from `--results` when finished.
2. `nikl-ray distill` of it: a student from one of its backbones (`--student`), cross-fitted
   students for its out-of-fold score, the served student, its ONNX and int8 forms.
3. On the same held-out dev rows, each of the ensemble and the student's three forms:
   micro-F1 (its own rule), batch rows/s (Predictor.predict over every dev row at once, after a
   warm-up), single-request p50/p95 latency over HTTP (Ray Serve on loopback, one request at a time),
   and the serving replica's resident memory (RSS of its process, after the requests) — each also
   as a ratio to the ensemble's, all measured in this one run.

Writes `distill_benchmark.json` / `.md` beside the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import nikl_ray as nr  # noqa: E402
from nikl_ray.artifacts import read_json, write_json, write_text  # noqa: E402
from nikl_ray.config import parse_experiment  # noqa: E402
from nikl_ray.data import read_rows  # noqa: E402
from nikl_ray.metrics import micro_f1  # noqa: E402
from nikl_ray.tables import markdown  # noqa: E402

FORMS = [None, "fp32", "int8", "onnx"]  # None: the ensemble


def name_of(form: str | None) -> str:
    return "ensemble" if form is None else f"student {form}"


def replica_rss() -> int:
    """Resident bytes of the serving replica's process (one replica, on this machine)."""
    import psutil
    from ray.util.state import list_actors

    actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.startswith("ServeReplica")]
    return psutil.Process(actors[0].pid).memory_info().rss


def served(results: Path, form: str | None, texts: list[str], port: int) -> dict:
    """p50/p95 seconds of single requests, one at a time, and the replica's RSS after them."""
    from ray import serve

    from nikl_ray.serve import deploy

    url = deploy(results, port=port, student=form)
    try:
        seconds = []
        for text in texts:
            body = json.dumps({"text": text}, ensure_ascii=False).encode()
            request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as answer:
                answer.read()
            seconds.append(time.perf_counter() - t0)
        rss = replica_rss()
    finally:
        serve.shutdown()
    cuts = statistics.quantiles(seconds, n=20)
    return {"p50_ms": 1000 * statistics.median(seconds), "p95_ms": 1000 * cuts[18], "rss_mb": rss / 2**20}


def main(argv=None) -> int:
    import nikl_cpu

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "nikl_ea_2023"))
    ap.add_argument("--results", default=str(REPO / "results" / "distill-bench"))
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--student", default="neox-tiny", help="the backbone the student starts from")
    ap.add_argument("--student-epochs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100, help="single HTTP requests per model")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--num-cpus", type=int)
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    if nikl_cpu.missing_data(data, "dev.jsonl"):
        return 2
    from nikl_ray.cli import setup_logging

    setup_logging(0)
    started = time.time()
    raw = nikl_cpu.holdout_experiment(args.data_dir, args.results, args.folds, args.epochs, ["tfidf-lr"])
    raw["distill"] = {"student": args.student, "overrides": {"epochs": args.student_epochs}}
    run = nr.open_run(parse_experiment(raw, REPO, "benchmark"))
    nr.connect(run, local=True, num_cpus=args.num_cpus)
    t0 = time.time()
    out = nr.pipeline(run)
    ensemble_s = time.time() - t0
    t0 = time.time()
    nr.distill(run)
    distill_s = time.time() - t0
    layout = run.layout

    dev = read_rows(data / "dev.jsonl", run.config.task)
    rows = dev.inputs()
    results = {}
    for form in FORMS:
        predictor = nr.Predictor.load(layout.root, student=form)
        predictor.warm_up()
        t0 = time.perf_counter()
        prediction = predictor.predict(rows)
        batch_s = time.perf_counter() - t0
        results[name_of(form)] = {"micro_f1": micro_f1(dev.labels, prediction.decisions), "rule": prediction.rule,
                                  "rows_per_s": len(rows) / batch_s}
        results[name_of(form)].update(served(layout.root, form, dev.texts[:args.requests], args.port))
        print(name_of(form), results[name_of(form)], flush=True)
    base = results["ensemble"]
    for r in results.values():
        r["rows_per_s_ratio"] = r["rows_per_s"] / base["rows_per_s"]
        r["p50_ratio"], r["p95_ratio"] = r["p50_ms"] / base["p50_ms"], r["p95_ms"] / base["p95_ms"]
        r["rss_ratio"] = r["rss_mb"] / base["rss_mb"]
    student = read_json(layout.student_record)
    result = {"data": str(data), "dev_rows": len(dev), "folds": args.folds, "epochs": args.epochs,
              "teacher": student["teacher"], "student": student["name"], "student_epochs": args.student_epochs,
              "out_of_fold_micro_f1": {n: s["score"] for n, s in student["scores"].items()},
              "stage_seconds": {**out["stage_seconds"], "pipeline": ensemble_s, "distill": distill_s},
              "exports": student["exports"], "held_out": results, "total_seconds": time.time() - started}
    here = Path(args.results).resolve()
    path = write_json(here / "distill_benchmark.json", result)
    table = [{"model": n, "dev micro-F1": r["micro_f1"], "rule": r["rule"], "batch rows/s": r["rows_per_s"],
              "× ensemble": r["rows_per_s_ratio"], "p50 ms": r["p50_ms"], "p95 ms": r["p95_ms"],
              "p50 × ensemble": r["p50_ratio"], "replica RSS MB": r["rss_mb"], "RSS × ensemble": r["rss_ratio"]}
             for n, r in results.items()]
    oof = result["out_of_fold_micro_f1"]
    lines = ["# Distilled student against the ensemble, NIKL dev (held out)\n",
             f"{len(dev)} dev rows never seen by the run; teacher **{student['teacher']}** (out-of-fold "
             f"{oof[student['teacher']]:.4f}), student {student['name']} (out-of-fold {oof['student']:.4f}, "
             f"{args.student_epochs} epochs); {args.folds} folds, {result['total_seconds'] / 60:.1f} min in all "
             f"(pipeline {ensemble_s / 60:.1f}, distill {distill_s / 60:.1f}).\n",
             markdown(table)]
    write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
