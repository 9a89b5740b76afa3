"""The ensemble stage: stack every member's out-of-fold features under small MLP heads.

1. Per row, the features of all members are concatenated (pooled hidden state + probabilities
   of neural members, probabilities of the classical one) and standardised.
2. MLP heads (two SELU hidden layers with alpha dropout, as the 2023 winners used) are trained
   with an inner K-fold and early stopping on inner held-out micro-F1: one Ray task per
   (hidden size × inner fold), all submitted at once, so the hidden sizes train in parallel.
   The heads' probabilities are averaged.
3. Decision rules are fitted and scored on out-of-fold probabilities (one global threshold,
   per-label thresholds, at least one label), for the stack and for two simpler ensembles
   (averaging the members' own probabilities, majority voting) and every single member, so the
   report shows what stacking earns.
4. The best rule for the stack is applied to the test rows; the submission is written in the
   task's own format.

Test rows: fold model k's features go through the heads and the results are averaged over k,
so a head only ever sees features of the kind it was trained on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nikl_ray.artifacts import manifest_problem, read_json, sha256_file, write_json, write_manifest, write_text
from nikl_ray.config import EnsembleConfig, Experiment
from nikl_ray.data import Rows, decide_single_label, write_predictions
from nikl_ray.features import feature_dir, load_member, member_names
from nikl_ray.metrics import per_label_table, scores

RULES = ("threshold_0.5", "global_threshold", "per_label_thresholds", "at_least_one")


# ---------------------------------------------------------------------------- decisions
def decide(probs: np.ndarray, rule: str, params: dict | None = None, multi_label: bool = True) -> np.ndarray:
    if not multi_label:
        return decide_single_label(probs)
    if rule == "threshold_0.5":
        return probs >= 0.5
    if rule == "global_threshold":
        return probs >= params["threshold"]
    if rule == "per_label_thresholds":
        return probs >= np.asarray(params["thresholds"])
    if rule == "at_least_one":
        out = probs >= params["threshold"]
        out[np.arange(len(probs)), probs.argmax(1)] |= ~out.any(1)
        return out
    raise ValueError(f"unknown decision rule {rule!r}")


def _micro(y, pred) -> float:
    tp = float((pred & (y > 0)).sum())
    denom = float(pred.sum() + (y > 0).sum())
    return 2 * tp / denom if denom else 0.0


def fit_rule(probs: np.ndarray, y: np.ndarray, rule: str) -> dict:
    """The rule's parameters that maximise out-of-fold micro-F1 (a grid of thresholds)."""
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
    if rule == "threshold_0.5":
        return {}
    if rule in ("global_threshold", "at_least_one"):
        best = max(grid, key=lambda t: _micro(y, decide(probs, rule, {"threshold": t})))
        return {"threshold": float(best)}
    if rule == "per_label_thresholds":
        t = np.full(probs.shape[1], fit_rule(probs, y, "global_threshold")["threshold"])
        for _ in range(2):  # coordinate ascent on the overall micro-F1
            for j in range(len(t)):
                def score(v, j=j):
                    trial = t.copy()
                    trial[j] = v
                    return _micro(y, probs >= trial)
                t[j] = max(grid, key=score)
        return {"thresholds": [float(v) for v in t]}
    raise ValueError(rule)


def score_rules(probs: np.ndarray, y: np.ndarray, multi_label: bool) -> dict:
    """{rule: {"params", "micro_f1"}} for every rule (argmax only for single-label tasks)."""
    if not multi_label:
        return {"argmax": {"params": {}, "micro_f1": _micro(y, decide_single_label(probs))}}
    out = {}
    for rule in RULES:
        params = fit_rule(probs, y, rule)
        out[rule] = {"params": params, "micro_f1": _micro(y, decide(probs, rule, params))}
    return out


# ---------------------------------------------------------------------------- heads
def make_head(d_in: int, hidden: int, n_out: int, dropout: float):
    import torch.nn as nn

    return nn.Sequential(nn.Linear(d_in, hidden), nn.SELU(), nn.AlphaDropout(dropout),
                         nn.Linear(hidden, hidden), nn.SELU(), nn.AlphaDropout(dropout), nn.Linear(hidden, n_out))


def train_head(job: dict, x: np.ndarray, y: np.ndarray, x_tests: list[np.ndarray]) -> dict:
    """Ray task: one head (hidden size × inner fold). Returns its held-out and test probabilities."""
    import torch

    started = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(job["seed"])
    cfg = EnsembleConfig(**job["config"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    multi = job["multi_label"]
    tr, va = np.asarray(job["train_idx"]), np.asarray(job["val_idx"])
    xt = torch.tensor(x[tr], device=device)
    yt = torch.tensor(y[tr], device=device) if multi else torch.tensor(y[tr].argmax(1), device=device)
    xv = torch.tensor(x[va], device=device)
    head = make_head(x.shape[1], job["hidden"], y.shape[1], cfg.dropout).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=1e-5)
    loss_fn = torch.nn.BCEWithLogitsLoss() if multi else torch.nn.CrossEntropyLoss()
    to_probs = torch.sigmoid if multi else (lambda z: torch.softmax(z, 1))
    gen = torch.Generator(device="cpu").manual_seed(job["seed"])
    best, best_state, best_epoch, since = -1.0, None, 0, 0
    for epoch in range(cfg.epochs):
        head.train()
        for batch in torch.randperm(len(tr), generator=gen).split(cfg.batch_size):
            opt.zero_grad()
            loss_fn(head(xt[batch]), yt[batch]).backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            pv = to_probs(head(xv)).cpu().numpy()
        f1 = _micro(y[va], pv >= 0.5) if multi else _micro(y[va], decide_single_label(pv))
        if f1 > best:
            best, best_epoch, since = f1, epoch, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            since += 1
            if since >= cfg.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        val_probs = to_probs(head(xv)).cpu().numpy()
        test_probs = [to_probs(head(torch.tensor(xt_, device=device))).cpu().numpy() for xt_ in x_tests]
    return {"hidden": job["hidden"], "inner_fold": job["inner_fold"], "val_idx": va, "val_probs": val_probs,
            "test_probs": np.mean(test_probs, axis=0) if test_probs else None, "best_epoch": best_epoch,
            "inner_micro_f1": best, "state": {k: v.cpu().numpy() for k, v in best_state.items()},
            "start": started, "end": time.time()}


def stack_features(parts: list[tuple], use_hidden: bool = True) -> np.ndarray:
    """Concatenate (hidden | None, probs) blocks of several members into one matrix.

    Probabilities enter as clipped logits: on that scale a head can pass a strong member
    through nearly linearly.
    """
    blocks = []
    for hidden, probs in parts:
        if hidden is not None and use_hidden:
            blocks.append(hidden)
        p = np.clip(probs, 1e-4, 1 - 1e-4)
        blocks.append(np.log(p / (1 - p)))
    return np.concatenate(blocks, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------- the stage
def ensemble_inputs(exp: Experiment, members: list[str], k: int) -> dict:
    feats = {f"{m}/fold{f}": sha256_file(feature_dir(exp, m, f) / "manifest.json") for m in members for f in range(k)}
    return {"features": feats, "ensemble": exp.ensemble.model_dump(), "task": exp.task.model_dump(mode="json")}


def ensemble_stage(exp: Experiment, rows: Rows, folds: dict, test: Rows | None) -> Path:
    """Train the heads, compare the ensembles, write report, plot and submission. Returns the report path."""
    import ray
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
    from sklearn.model_selection import StratifiedKFold

    from nikl_ray.cluster import cluster_resources

    out_dir = exp.results / "ensemble"
    members = member_names(exp)
    inputs = ensemble_inputs(exp, members, folds["k"])
    if manifest_problem(out_dir, inputs) is None:
        print(f"ensemble: done already ({out_dir})", flush=True)
        return out_dir / "report.md"
    task, cfg, y = exp.task, exp.ensemble, rows.labels
    test_ids = test.ids if test is not None else None
    loaded = {m: load_member(exp, m, folds["k"], rows.ids, test_ids) for m in members}
    x = stack_features([(h, p) for h, p, _ in loaded.values()], cfg.use_hidden)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    x_tests = [(stack_features([loaded[m][2][f] for m in members], cfg.use_hidden) - mean) / std for f in range(folds["k"])] if test else []

    # One Ray task per (hidden size × inner fold), all at once.
    split_y = y if task.multi_label else y.argmax(1)
    splitter = (MultilabelStratifiedKFold if task.multi_label else StratifiedKFold)(
        n_splits=cfg.inner_folds, shuffle=True, random_state=cfg.seed)
    inner = list(splitter.split(np.zeros((len(y), 1)), split_y))
    _, gpus = cluster_resources()
    remote = ray.remote(num_cpus=1, num_gpus=0.125 if gpus else 0)(train_head)
    x_ref, y_ref, xt_ref = ray.put(x), ray.put(y), ray.put(x_tests)
    refs = [remote.remote({"hidden": h, "inner_fold": j, "train_idx": tr, "val_idx": va, "seed": cfg.seed + j,
                           "config": cfg.model_dump(), "multi_label": task.multi_label}, x_ref, y_ref, xt_ref)
            for h in cfg.hidden_sizes for j, (tr, va) in enumerate(inner)]
    print(f"ensemble: {len(refs)} heads ({len(cfg.hidden_sizes)} hidden sizes × {cfg.inner_folds} inner folds) "
          f"on {x.shape[1]} features of {len(members)} member(s)", flush=True)
    heads = ray.get(refs)

    # Out-of-fold probabilities of each hidden size, and of the stack (their mean).
    by_hidden = {h: np.zeros_like(y) for h in cfg.hidden_sizes}
    test_probs = []
    for r in heads:
        by_hidden[r["hidden"]][r["val_idx"]] = r["val_probs"]
        if r["test_probs"] is not None:
            test_probs.append(r["test_probs"])
    stack_oof = np.mean(list(by_hidden.values()), axis=0)

    # The comparison: every member, probability averaging, voting, the stack.
    member_probs = {m: loaded[m][1] for m in members}
    avg_oof = np.mean(list(member_probs.values()), axis=0)
    votes = np.mean([decide(p, "threshold_0.5", multi_label=task.multi_label) for p in member_probs.values()], axis=0)
    table = {m: score_rules(p, y, task.multi_label) for m, p in member_probs.items()}
    table["prob-average"] = score_rules(avg_oof, y, task.multi_label)
    vote_pred = votes > 0.5 if task.multi_label else decide_single_label(votes)
    table["majority-vote"] = {"votes>half": {"params": {}, "micro_f1": _micro(y, vote_pred)}}
    table["stack"] = score_rules(stack_oof, y, task.multi_label)
    hidden_scores = {h: score_rules(p, y, task.multi_label) for h, p in by_hidden.items()}
    rule = max(table["stack"], key=lambda r: table["stack"][r]["micro_f1"])
    params = table["stack"][rule]["params"]

    report = {"members": members, "rows": len(rows), "features": int(x.shape[1]), "table": table,
              "by_hidden_size": {str(h): v for h, v in hidden_scores.items()}, "chosen_rule": rule, "chosen_params": params,
              "stack_oof_scores": scores(y, decide(stack_oof, rule, params, task.multi_label), task.labels),
              "per_label": per_label_table(y, decide(stack_oof, rule, params, task.multi_label), task.labels),
              "heads": [{k: r[k] for k in ("hidden", "inner_fold", "best_epoch", "inner_micro_f1", "start", "end")} for r in heads]}
    files = _save_heads(out_dir, heads, mean, std, members)
    files.append(write_json(out_dir / "report.json", report))
    files.append(write_text(out_dir / "report.md", report_markdown(report)))
    files.append(plot_report(report, out_dir / "report.png"))
    files.append(write_json(out_dir / "decision.json", {"rule": rule, "params": params, "members": members,
                                                         "hidden_sizes": cfg.hidden_sizes, "inner_folds": cfg.inner_folds}))
    if test is not None:
        final = np.mean(test_probs, axis=0)
        sub = write_predictions(test, decide(final, rule, params, task.multi_label), out_dir / submission_name(exp))
        files.append(sub)
        print(f"ensemble: submission written to {sub}", flush=True)
    write_manifest(out_dir, inputs=inputs, files=files)
    print(report_markdown(report).split("\n## Per label")[0], flush=True)
    return out_dir / "report.md"


def submission_name(exp: Experiment) -> str:
    suffix = ".txt" if exp.task.format == "tsv" else ".jsonl"
    return f"submission{suffix}"


def _save_heads(out_dir: Path, heads: list[dict], mean, std, members) -> list[Path]:
    from safetensors.numpy import save_file

    from nikl_ray.artifacts import atomic_path

    files = []
    for r in heads:
        path = out_dir / "heads" / f"h{r['hidden']}_inner{r['inner_fold']}.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in r["state"].items()}, str(tmp))
        files.append(path)
    path = out_dir / "heads" / "standardize.safetensors"
    with atomic_path(path) as tmp:
        save_file({"mean": mean.astype(np.float32), "std": std.astype(np.float32)}, str(tmp))
    return files + [path]


# ---------------------------------------------------------------------------- report
def report_markdown(report: dict) -> str:
    rules = sorted({r for v in report["table"].values() for r in v}, key=lambda r: (RULES + ("argmax", "votes>half")).index(r))
    lines = [f"# Ensemble report\n\n{report['rows']} labelled rows, {report['features']} stacked features, "
             f"members: {', '.join(report['members'])}. All scores are out-of-fold micro-F1.\n",
             "| ensemble | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for name, by_rule in report["table"].items():
        cells = [f"{by_rule[r]['micro_f1']:.4f}" if r in by_rule else "" for r in rules]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [f"\nChosen for the submission: **stack**, rule `{report['chosen_rule']}` {report['chosen_params']}; "
              f"out-of-fold micro-F1 {report['stack_oof_scores']['micro_f1']:.4f}.\n",
              "## Heads by hidden size\n", "| hidden | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for h, by_rule in report["by_hidden_size"].items():
        lines.append(f"| {h} | " + " | ".join(f"{by_rule[r]['micro_f1']:.4f}" if r in by_rule else "" for r in rules) + " |")
    lines += ["\n## Per label (stack, chosen rule)\n", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |" for r in report["per_label"]]
    return "\n".join(lines) + "\n"


def _best(by_rule: dict) -> float:
    return max(v["micro_f1"] for v in by_rule.values())


def plot_report(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nikl_ray.artifacts import atomic_path

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    hs = list(report["by_hidden_size"])
    a.plot(range(len(hs)), [_best(report["by_hidden_size"][h]) for h in hs], marker="o")
    a.set_xticks(range(len(hs)), hs)
    a.set(title="Stacked heads by hidden size", xlabel="hidden size", ylabel="out-of-fold micro-F1 (best rule)")
    names = list(report["table"])
    vals = [_best(report["table"][n]) for n in names]
    colors = ["tab:green" if n == "stack" else "tab:orange" if n in ("prob-average", "majority-vote") else "tab:blue" for n in names]
    b.barh(names, vals, color=colors)
    for i, v in enumerate(vals):
        b.text(v, i, f" {v:.3f}", va="center")
    b.set(title="Members and ensembles", xlabel="out-of-fold micro-F1 (best rule)", xlim=(0, min(1.0, max(vals) * 1.2)))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def load_decision(exp: Experiment) -> dict:
    return read_json(exp.results / "ensemble" / "decision.json")
