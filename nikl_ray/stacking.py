"""Stacked MLP heads over the members' features, and the one function that turns member features
into a candidate's probabilities — for out-of-fold rows, test rows and a served sentence alike.

Heads: two SELU hidden layers with alpha dropout (as the 2023 winners used), one per
(stack, hidden size, inner fold). A head trains on the other inner folds, stops early on a
slice of *its own training rows*, and answers for the rows of its inner fold. A row — out-of-fold
or test — is answered by the heads of one inner fold (its own for labelled rows; one chosen
by a stable hash of its content for others), averaged over hidden sizes.

Two stacks are candidates: `stack` (the members' probabilities, as clipped logits) and
`stack+hidden` (their pooled hidden states too), since hidden states are not always worth
stacking (thousands of columns on a few thousand rows overfit).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nikl_ray.decision import decide
from nikl_ray.placement import cap_memory

log = logging.getLogger(__name__)
STACKS = {"stack": False, "stack+hidden": True}  # name → whether hidden states are stacked
SIMPLE = ("prob-average", "majority-vote")


def stack_matrix(parts: list[tuple], use_hidden: bool) -> np.ndarray:
    """Concatenate (hidden | None, probs) blocks of members into one matrix. Probabilities enter as
    clipped logits: on that scale a head can pass a strong member through nearly linearly."""
    blocks = []
    for hidden, probs in parts:
        if use_hidden and hidden is not None:
            blocks.append(hidden)
        p = np.clip(probs, 1e-4, 1 - 1e-4)
        blocks.append(np.log(p / (1 - p)))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def make_head(d_in: int, hidden: int, n_out: int, dropout: float):
    import torch.nn as nn

    return nn.Sequential(nn.Linear(d_in, hidden), nn.SELU(), nn.AlphaDropout(dropout),
                         nn.Linear(hidden, hidden), nn.SELU(), nn.AlphaDropout(dropout), nn.Linear(hidden, n_out))


@dataclass(frozen=True)
class HeadJob:
    stack: str
    hidden: int
    inner_fold: int
    train_idx: np.ndarray
    seed: int
    multi_label: bool
    epochs: int
    patience: int
    early_stopping: float
    dropout: float
    lr: float
    batch_size: int
    device: str = "cpu"
    memory_fraction: float | None = None


def train_head(job: HeadJob, x: np.ndarray, y: np.ndarray) -> dict:
    """Ray task: one head. Early stopping looks only at a slice of `job.train_idx` (by its loss)."""
    import torch

    started = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(job.seed)
    dev = job.device if job.device == "cuda" and torch.cuda.is_available() else "cpu"
    cap_memory(job.memory_fraction, job.device)
    rng = np.random.default_rng(job.seed)
    idx = rng.permutation(job.train_idx)
    n_stop = int(round(job.early_stopping * len(idx)))
    stop_idx, fit_idx = idx[:n_stop], idx[n_stop:]
    target = (lambda i: torch.tensor(y[i], device=dev)) if job.multi_label else (lambda i: torch.tensor(y[i].argmax(1), device=dev))
    xt, yt = torch.tensor(x[fit_idx], device=dev), target(fit_idx)
    xs, ys = torch.tensor(x[stop_idx], device=dev), target(stop_idx)
    head = make_head(x.shape[1], job.hidden, y.shape[1], job.dropout).to(dev)
    opt = torch.optim.Adam(head.parameters(), lr=job.lr, weight_decay=1e-5)
    loss_fn = torch.nn.BCEWithLogitsLoss() if job.multi_label else torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(job.seed)
    best, best_state, best_epoch, since = float("inf"), None, job.epochs - 1, 0
    for epoch in range(job.epochs):
        head.train()
        for batch in torch.randperm(len(fit_idx), generator=gen).split(job.batch_size):
            batch = batch.to(dev)
            opt.zero_grad()
            loss_fn(head(xt[batch]), yt[batch]).backward()
            opt.step()
        if not n_stop:
            continue
        head.eval()
        with torch.no_grad():
            stop_loss = float(loss_fn(head(xs), ys))
        if stop_loss < best:
            best, best_epoch, since = stop_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            since += 1
            if since >= job.patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    return {"stack": job.stack, "hidden": job.hidden, "inner_fold": job.inner_fold, "best_epoch": best_epoch,
            "stop_loss": best if n_stop else None, "state": {k: v.cpu().numpy() for k, v in head.state_dict().items()},
            "start": started, "end": time.time()}


def fit_heads(xs: dict[str, np.ndarray], y: np.ndarray, inner: np.ndarray, cfg, multi_label: bool, placement,
              device: str = "cpu") -> tuple[dict[str, "Heads"], list[dict]]:
    """Every head of every stack ({stack: raw feature matrix}) as parallel, named Ray tasks, each with
    the placement's resources; `cfg` is the EnsembleConfig. Heads train on standardised features and
    keep the standardisation, so they are always given raw ones."""
    import sys

    import ray
    from tqdm import tqdm

    remote = ray.remote(num_cpus=placement.cpus, num_gpus=placement.gpu_share)(train_head)
    y_ref, refs, norms = ray.put(y), [], {}
    for stack, x in xs.items():
        norms[stack] = (x.mean(0), x.std(0) + 1e-6)
        x_ref = ray.put(((x - norms[stack][0]) / norms[stack][1]).astype(np.float32))
        for h in cfg.hidden_sizes:
            for j in range(cfg.inner_folds):
                job = HeadJob(stack, h, j, np.flatnonzero(inner != j), cfg.seed + j, multi_label, cfg.epochs, cfg.patience,
                              cfg.early_stopping, cfg.dropout, cfg.lr, cfg.batch_size, device, placement.memory_fraction)
                refs.append(remote.options(name=f"head {stack} h{h} inner{j}").remote(job, x_ref, y_ref))
    log.info("ensemble: %d heads (%s × %d hidden sizes × %d inner folds)", len(refs), " and ".join(xs),
             len(cfg.hidden_sizes), cfg.inner_folds)
    done, pending = [], list(refs)
    with tqdm(total=len(refs), desc="heads", disable=not sys.stderr.isatty()) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done.append(ray.get(ready[0]))
            bar.update(1)
    heads = {stack: Heads(stack, {(r["hidden"], r["inner_fold"]): r["state"] for r in done if r["stack"] == stack},
                          *norms[stack], y.shape[1], multi_label) for stack in xs}
    runs = [{k: r[k] for k in ("stack", "hidden", "inner_fold", "best_epoch", "stop_loss", "start", "end")} for r in done]
    return heads, runs


class Heads:
    """The heads of one stack: (hidden size, inner fold) → head, with the standardisation of their input."""

    def __init__(self, stack: str, states: dict[tuple[int, int], dict], mean: np.ndarray, std: np.ndarray, n_out: int,
                 multi_label: bool, dropout: float = 0.0):
        import torch

        self.stack, self.mean, self.std, self.n_out, self.multi_label = stack, mean, std, n_out, multi_label
        self.hidden_sizes = sorted({h for h, _ in states})
        self.inner_folds = len({j for _, j in states})
        self.heads = {}
        for (h, j), state in states.items():
            head = make_head(len(mean), h, n_out, dropout)
            head.load_state_dict({k: torch.tensor(np.array(v)) for k, v in state.items()})
            self.heads[(h, j)] = head.eval()
        self.states = states

    def predict(self, x_raw: np.ndarray, inner: np.ndarray | None, hidden: int | None = None) -> np.ndarray:
        """Probabilities of rows: each from the heads of its inner fold (without `inner`, bagged: from
        every inner fold's, averaged), averaged over hidden sizes (or from one hidden size)."""
        import torch

        x = torch.tensor((x_raw - self.mean) / self.std, dtype=torch.float32)
        out = np.zeros((len(x_raw), self.n_out), np.float32)
        sizes = [hidden] if hidden is not None else self.hidden_sizes
        with torch.no_grad():
            for j in range(self.inner_folds):
                rows = np.arange(len(x_raw)) if inner is None else np.flatnonzero(inner == j)
                if not len(rows):
                    continue
                logits = [self.heads[(h, j)](x[rows]) for h in sizes]
                probs = [torch.sigmoid(z) if self.multi_label else torch.softmax(z, 1) for z in logits]
                out[rows] += torch.stack(probs).mean(0).numpy() / (self.inner_folds if inner is None else 1)
        return out

    def save(self, folder: Path) -> list[Path]:
        from safetensors.numpy import save_file

        from nikl_ray.artifacts import atomic_path

        files = []
        for (h, j), state in self.states.items():
            path = folder / f"{self.stack}_h{h}_inner{j}.safetensors"
            with atomic_path(path) as tmp:
                save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
            files.append(path)
        path = folder / f"{self.stack}_standardize.safetensors"
        with atomic_path(path) as tmp:
            save_file({"mean": self.mean.astype(np.float32), "std": self.std.astype(np.float32)}, str(tmp))
        return files + [path]

    @classmethod
    def load(cls, folder: Path, stack: str, hidden_sizes: list[int], inner_folds: int, n_out: int, multi_label: bool) -> "Heads":
        from safetensors.numpy import load_file

        norm = load_file(str(folder / f"{stack}_standardize.safetensors"))
        states = {(h, j): load_file(str(folder / f"{stack}_h{h}_inner{j}.safetensors"))
                  for h in hidden_sizes for j in range(inner_folds)}
        return cls(stack, states, norm["mean"], norm["std"], n_out, multi_label)


def candidate_probs(name: str, features: dict[str, tuple], active: list[str], heads: dict[str, Heads],
                    inner: np.ndarray | None, multi_label: bool) -> np.ndarray:
    """A candidate's probabilities from member features {member: (hidden | None, probs)} of the same rows.

    Members answer with their own probabilities; `prob-average` averages the active members';
    `majority-vote` is the share of active members that say yes (argmax for single-label); the
    stacks run their heads, each row through the heads of its inner fold (`inner`; None: through
    every inner fold's, averaged).
    """
    if name in features:
        return features[name][1]
    if name == "prob-average":
        return np.mean([features[m][1] for m in active], axis=0)
    if name == "majority-vote":
        rule = "threshold_0.5" if multi_label else "argmax"
        return np.mean([decide(features[m][1], rule) for m in active], axis=0).astype(np.float32)
    stack, _, hidden = name.partition("@h")
    x = stack_matrix([features[m] for m in active], STACKS[stack])
    return heads[stack].predict(x, inner, int(hidden) if hidden else None)
