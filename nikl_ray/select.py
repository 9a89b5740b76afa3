"""What to label next: rank a pool of unlabeled rows by how unsure the finished run is, and how unlike
the training text they are.

- uncertainty, in [0, 1]: multi-label — for the label closest to its decision threshold,
  1 − |p − t| / max(t, 1 − t) (1 on the threshold, 0 at certainty); single-label — the
  normalised 1 − max p (1 when every class is equally likely).
- rarity, in [0, 1]: the share of a row's words that the training text has at most once (or never):
  the words it has more than once are kept with the run (`Predictor.repeated_words`).
- score = uncertainty + `rarity_weight` × rarity.

The chosen rows are written in the task's own input format with their scores attached (JSON
Lines: a `selection` object; tsv: extra columns), so they go straight to annotators.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nikl_ray.data import Rows


def uncertainty(probs: np.ndarray, thresholds: np.ndarray, multi_label: bool) -> np.ndarray:
    if not multi_label:
        k = probs.shape[1]
        return (1 - probs.max(1)) / (1 - 1 / k)
    t = np.where(np.isnan(thresholds), 0.5, thresholds)
    closeness = 1 - np.abs(probs - t) / np.maximum(t, 1 - t)
    return closeness.max(1)


def rarity(texts: list[str], repeated: set[str]) -> np.ndarray:
    """The share of each text's words outside `repeated` (the words the training text has more than once)."""
    return np.array([np.mean([w not in repeated for w in t.split()]) if t.split() else 1.0 for t in texts])


def rank(predictor, pool: Rows, rarity_weight: float = 0.5) -> list[dict]:
    """Every pool row with its scores, most worth labelling first."""
    probs = predictor.predict(pool.inputs()).probs
    u = uncertainty(probs, predictor.thresholds(), predictor.task.multi_label)
    r = rarity(pool.texts, predictor.repeated_words())
    score = u + rarity_weight * r
    order = np.argsort(-score, kind="stable")
    return [{"index": int(i), "id": pool.ids[i], "score": float(score[i]), "uncertainty": float(u[i]),
             "rarity": float(r[i]), "probabilities": dict(zip(predictor.task.labels, map(float, probs[i])))} for i in order]


def write_selection(pool: Rows, ranked: list[dict], n: int, path: str | Path) -> Path:
    """The first `n` ranked rows, as the task's input format, scores attached."""
    from nikl_ray.artifacts import atomic_path

    task, chosen = pool.task, ranked[:n]
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        if task.format == "tsv":
            f.write(f"{task.id_field}\t{task.text_field}\tscore\tuncertainty\trarity\n")
            for c in chosen:
                f.write(f"{c['id']}\t{pool.texts[c['index']]}\t{c['score']:.4f}\t{c['uncertainty']:.4f}\t{c['rarity']:.4f}\n")
        else:
            for c in chosen:
                record = dict(pool.records[c["index"]])
                record.pop(task.label_field, None)
                record["selection"] = {k: c[k] for k in ("score", "uncertainty", "rarity", "probabilities")}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
