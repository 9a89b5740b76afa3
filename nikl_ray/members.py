"""What a member of the ensemble is and how one fold model of it reads rows.

- A neural member is a backbone: each fold model gives, per row, its probabilities and its
  pooled last hidden state (the first token for encoders, the last real token for decoders,
  under left and right padding alike).
- The classical member `tfidf-lr`: character 1–4-gram TF-IDF + one logistic regression per
  label (scikit-learn), fitted per fold. A label with no positive (or no negative) row in a
  fold's training part gets a constant model. It is kept as a JSON vocabulary + `.npy` arrays,
  never pickled.

The features stage and the Predictor both use these, so a row is read the same way in both.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nikl_ray.backbones import BackboneSpec
from nikl_ray.data import TextRows
from nikl_ray.metrics import sigmoid, to_probs
from nikl_ray.modes import mode_of

log = logging.getLogger(__name__)
CLASSICAL = "tfidf-lr"
RETRIEVAL = "retrieval"  # a generate task's classical member (nikl_ray/qa/answers.py)


def member_names(exp) -> list[str]:
    """The experiment's members: its backbones, then the classical member when enabled (TF-IDF +
    logistic regression, or a generate task's retrieval member)."""
    return [b.name for b in exp.backbones] + ([RETRIEVAL if exp.task.generates else CLASSICAL] if exp.classical else [])


# ---------------------------------------------------------------------------- neural members
def pool(hidden, attention_mask, family: str):
    """First token for encoders; the last real token for decoders, whichever side was padded."""
    import torch

    if family == "encoder":
        first = attention_mask.float().argmax(1)  # first real token (0 under right padding)
        return hidden[torch.arange(len(hidden)), first]
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(1)
    return hidden[torch.arange(len(hidden)), last]


def embed(spec: BackboneSpec, tokenizer, model, rows: TextRows, multi_label: bool, batch_size: int = 64,
          progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pooled hidden states, probabilities) of rows, in their given order; batches sorted by length.
    With `progress`, a progress bar of that name (in the driver's console when run in a Ray task)."""
    import torch
    from transformers import DataCollatorWithPadding

    from nikl_ray.encode import encode

    if not len(rows):
        return np.zeros((0, model.config.hidden_size), np.float32), np.zeros((0, model.config.num_labels), np.float32)
    enc = encode(tokenizer, spec, rows)
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    order = np.argsort(lengths, kind="stable")
    if mode_of(spec).virtual_tokens:
        # left padding shifts a row's positions behind the virtual tokens: batch equal lengths only,
        # so a row gets the same output whatever rows come with it
        batches = [chunk for group in np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1)
                   for chunk in np.array_split(group, -(-len(group) // batch_size))]
    else:
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    hidden_out, prob_out = [None] * len(rows), [None] * len(rows)
    if progress and len(batches) >= 10:
        from ray.experimental.tqdm_ray import tqdm

        batches = tqdm(batches, desc=progress, total=len(batches))
    with torch.no_grad():
        for idx in batches:
            batch = collate([{k: enc[k][i] for k in enc} for i in idx]).to(device)
            out = model(**batch, output_hidden_states=True)
            hidden, mask = out.hidden_states[-1], batch["attention_mask"]
            if hidden.shape[1] > mask.shape[1]:  # prompt tuning: its virtual tokens come first
                mask = torch.cat([mask.new_ones(len(mask), hidden.shape[1] - mask.shape[1]), mask], dim=1)
            pooled = pool(hidden, mask, spec.family).float().cpu().numpy()
            probs = to_probs(out.logits.float().cpu().numpy(), multi_label)
            for j, i in enumerate(idx):
                hidden_out[i], prob_out[i] = pooled[j], probs[j]
    return np.stack(hidden_out), np.stack(prob_out)


def save_features(d: Path, parts: dict) -> list[Path]:
    """One fold model's features in `d`: per part (`oof`, `test`) its row ids (JSON) and its `probs`
    and `hidden` arrays (`.npy`; the classical member has no hidden states). Returns the files."""
    from nikl_ray.artifacts import save_npy, write_json

    files = []
    for part, arrays in parts.items():
        files.append(write_json(d / f"{part}_ids.json", arrays["ids"]))
        for key in ("hidden", "probs"):
            if arrays.get(key) is not None:
                files.append(save_npy(d / f"{part}_{key}.npy", arrays[key]))
    return files


def read_features(d: Path) -> dict:
    """What save_features wrote (raises OSError or ValueError when a file is missing or cut short)."""
    out = {}
    for part in ("oof", "test"):
        hidden = d / f"{part}_hidden.npy"
        out[part] = {"ids": json.loads((d / f"{part}_ids.json").read_text()),
                     "probs": np.load(d / f"{part}_probs.npy", allow_pickle=False),
                     "hidden": np.load(hidden, allow_pickle=False) if hidden.exists() else None}
    return out


# ---------------------------------------------------------------------------- classical member
def classical_text(rows: TextRows) -> list[str]:
    return [f"{t} | {g}" if g else t for t, g in zip(rows.texts, rows.targets)]


def _vectorizer(vocabulary: dict | None = None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), min_df=2, sublinear_tf=True, max_features=300_000,
                           vocabulary=vocabulary)


def fit_classical(rows: TextRows, labels: np.ndarray, multi_label: bool) -> dict:
    """{vocabulary, idf, coef (L', d), intercept (L',)}: one logistic regression per label (multi-label),
    one multinomial model (single-label; binary as one logit)."""
    from sklearn.linear_model import LogisticRegression

    vec = _vectorizer()
    x = vec.fit_transform(classical_text(rows))
    if multi_label:
        coef, intercept = np.zeros((labels.shape[1], x.shape[1]), np.float32), np.zeros(labels.shape[1], np.float32)
        for j in range(labels.shape[1]):
            y = labels[:, j] > 0
            if y.all() or not y.any():  # no positive (or no negative) row in this fold: a constant model
                rate = np.clip(y.mean(), 1e-4, 1 - 1e-4)
                intercept[j] = np.log(rate / (1 - rate))
                continue
            clf = LogisticRegression(C=4.0, max_iter=2000, solver="liblinear").fit(x, y)
            coef[j], intercept[j] = clf.coef_[0], clf.intercept_[0]
    else:
        clf = LogisticRegression(C=4.0, max_iter=2000).fit(x, labels.argmax(1))
        coef, intercept = clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)
    return {"vocabulary": {t: int(i) for t, i in vec.vocabulary_.items()}, "idf": vec.idf_.astype(np.float32),
            "coef": coef, "intercept": intercept}


def classical_probs(model: dict, rows: TextRows, multi_label: bool) -> np.ndarray:
    """Probabilities (n, L) of a fitted classical model."""
    vec = _vectorizer(model["vocabulary"])
    vec.idf_ = model["idf"]
    if not len(rows):  # a run without test rows (scikit-learn refuses an empty batch)
        logits = np.zeros((0, model["coef"].shape[0]))
    else:
        logits = np.asarray(vec.transform(classical_text(rows)) @ model["coef"].T) + model["intercept"]
    if multi_label:
        return sigmoid(logits).astype(np.float32)
    if logits.shape[1] == 1:  # scikit-learn's binary model: one logit for class 1
        p1 = sigmoid(logits[:, 0])
        return np.stack([1 - p1, p1], axis=1).astype(np.float32)
    return to_probs(logits, False).astype(np.float32)


def save_classical(d: Path, model: dict) -> list[Path]:
    from nikl_ray.artifacts import save_npy, write_json

    return [write_json(d / "model_vocabulary.json", model["vocabulary"])] + [
        save_npy(d / f"model_{k}.npy", model[k]) for k in ("idf", "coef", "intercept")]


def load_classical(d: Path) -> dict:
    model = {k: np.load(d / f"model_{k}.npy", allow_pickle=False) for k in ("idf", "coef", "intercept")}
    model["vocabulary"] = json.loads((d / "model_vocabulary.json").read_text(encoding="utf-8"))
    return model



def degenerate_members(layout, backbones: list[str], k: int) -> dict[str, list[str]]:
    """Backbone → why some of its fold models are degenerate (from the train manifests); only those with any."""
    from nikl_ray.artifacts import MANIFEST, load_manifest

    out = {}
    for name in backbones:
        reasons = [f"fold {f}: {m['degenerate']}" for f in range(k)
                   if (layout.pair(name, f) / MANIFEST).exists()
                   and (m := load_manifest(layout.pair(name, f))).get("degenerate")]
        if reasons:
            out[name] = reasons
    return out


def active_members(exp, k: int) -> tuple[list[str], dict[str, list[str]]]:
    """(the members an ensemble combines, {degenerate member: why}); says so for each left out, and
    refuses a run whose every member is degenerate."""
    dead = degenerate_members(exp.layout, [b.name for b in exp.backbones], k)
    for m, reasons in dead.items():
        log.warning("ensemble: %s is left out of every ensemble: degenerate fold model(s): %s", m, "; ".join(reasons))
    active = [m for m in member_names(exp) if m not in dead]
    if not active:
        raise RuntimeError(f"every member is degenerate: {dead}")
    return active, dead


@dataclass(frozen=True)
class MemberFeatures:
    """One member's features, aligned to the rows asked for: out-of-fold (each row from the fold
    model that held it out) and test (each row from the fold model it is assigned to)."""

    oof_hidden: np.ndarray | None
    oof_probs: np.ndarray
    test_hidden: np.ndarray | None
    test_probs: np.ndarray | None


def load_member(layout, member: str, k: int, ids: list[str], test_ids: list[str] | None) -> MemberFeatures:
    """Rows are matched by id; a row with no feature is an error."""
    folds = [read_features(layout.features(member, fold)) for fold in range(k)]

    def gather(part: str, want: list[str]):
        where = {rid: i for i, rid in enumerate(want)}
        hidden = probs = None
        for got in (f[part] for f in folds):
            if not got["ids"]:
                continue
            idx = np.array([where[r] for r in got["ids"]])
            p, h = got["probs"], got["hidden"]
            if probs is None:
                probs = np.full((len(want), p.shape[1]), np.nan, np.float32)
                hidden = None if h is None else np.full((len(want), h.shape[1]), np.nan, np.float32)
            probs[idx] = p
            if h is not None:
                hidden[idx] = h
        if probs is None or np.isnan(probs).any():
            raise ValueError(f"features of {member}: some {part} rows have no prediction")
        return hidden, probs

    oof_h, oof_p = gather("oof", ids)
    test_h, test_p = gather("test", test_ids) if test_ids else (None, None)
    return MemberFeatures(oof_h, oof_p, test_h, test_p)
