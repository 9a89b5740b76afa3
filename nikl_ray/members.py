"""What a member of the ensemble is and how one fold model of it reads rows.

- A neural member is a backbone: each fold model gives, per row, its probabilities and its
  pooled last hidden state (the first token for encoders, the last real token for decoders,
  under left and right padding alike).
- The classical members (scikit-learn), fitted per fold on its training part:
  `tfidf-lr`      character 1–4-gram TF-IDF + one logistic regression per label;
  `tfidf-wc-lr`   character 1–4-grams and word 1–2-grams together, logistic regression;
  `nbsvm`         NB-SVM (Wang & Manning 2012): binary character 1–5-gram features scaled by
                  each label's log-count ratio, a linear SVM, its scores made probabilities by
                  Platt scaling fitted on 3-fold cross-validated scores of the training part;
  `use-lr`        multilingual Universal Sentence Encoder v3 vectors of the text and of the target,
                  side by side, + logistic regression: the one pretrained view (SentenceVectors).
  Each is one linear model per label over its features (NB-SVM's ratio and Platt's slope fold
  into its weights), kept as JSON vocabularies (none for `use-lr`) + `.npy` arrays, never pickled. A label with
  no positive (or no negative) row in a fold's training part gets a constant model.

The features stage and the Predictor both use these, so a row is read the same way in both.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nikl_ray.backbones import BackboneSpec
from nikl_ray.data import TextRows
from nikl_ray.metrics import sigmoid, to_probs
from nikl_ray.modes import mode_of

log = logging.getLogger(__name__)
# a classical member's n-gram views (analyzer → n-gram range), their weighting and its classifier;
# NB-SVM's binary 1–5-grams and C were chosen on NSMC-like rows 100k–112k, which no benchmark scores
CLASSICAL = {"tfidf-lr": ({"char_wb": (1, 4)}, "tfidf", "lr"),
             "tfidf-wc-lr": ({"char_wb": (1, 4), "word": (1, 2)}, "tfidf", "lr"),
             "nbsvm": ({"char_wb": (1, 5)}, "binary", "nbsvm"),
             "use-lr": ({}, "sentence-vectors", "lr-dense")}
RETRIEVAL = "retrieval"  # a generate task's classical member (nikl_ray/qa/answers.py)


def member_names(exp) -> list[str]:
    """The experiment's members: its backbones, then its classical members (`classical: true` is
    TF-IDF + logistic regression alone; a generate task's is the retrieval member)."""
    return [b.name for b in exp.backbones] + classical_names(exp)


def classical_names(exp) -> list[str]:
    if not exp.classical:
        return []
    if exp.task.generates:
        return [RETRIEVAL]
    return ["tfidf-lr"] if exp.classical is True else list(exp.classical)


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


# ---------------------------------------------------------------------------- classical members
def classical_text(rows: TextRows) -> list[str]:
    return [f"{t} | {g}" if g else t for t, g in zip(rows.texts, rows.targets)]


class SentenceVectors:
    """USE v3 vectors (nikl_ray/qa/metrics.py UseEmbedder) of each row's text and of its target, side
    by side (1,024 columns; a row without a target has a space's). Each string is embedded once and
    kept, so a filled instance handed to every fold's Ray task spares them embedding the same rows."""

    def __init__(self, threads: int = 1):
        self.threads, self.index, self.array = threads, {}, np.zeros((0, 512), np.float32)

    def add(self, strings) -> "SentenceVectors":
        new = sorted(set(strings) - self.index.keys())
        if new:
            from nikl_ray.qa.metrics import UseEmbedder

            t0 = time.time()
            self.index |= {s: len(self.index) + i for i, s in enumerate(new)}
            self.array = np.concatenate([self.array, UseEmbedder(self.threads).encode(new)])
            log.info("sentence vectors: %d strings embedded in %.0f s", len(new), time.time() - t0)
        return self

    def __call__(self, rows: TextRows) -> np.ndarray:
        targets = [g or " " for g in rows.targets]
        self.add(list(rows.texts) + targets)
        return np.hstack([self.array[[self.index[t] for t in rows.texts]], self.array[[self.index[g] for g in targets]]])


def _vectorizer(analyzer: str, ngrams: tuple[int, int], weighting: str, vocabulary: dict | None = None):
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

    # one-character words count in Korean (꼭, 왜, 잘): the default word pattern drops them
    kw = dict(analyzer=analyzer, ngram_range=tuple(ngrams), min_df=2, max_features=300_000, vocabulary=vocabulary,
              **({"token_pattern": r"(?u)\b\w+\b"} if analyzer == "word" else {}))
    return TfidfVectorizer(sublinear_tf=True, **kw) if weighting == "tfidf" else CountVectorizer(binary=True, **kw)


def _features(vectorizers: dict, rows: TextRows, weighting: str, vectors: SentenceVectors | None):
    """A classical model's feature matrix of rows: its n-gram views side by side, or sentence vectors."""
    from scipy.sparse import hstack

    if weighting == "sentence-vectors":
        return (vectors or SentenceVectors())(rows)
    texts = classical_text(rows)
    return hstack([v.transform(texts) for v in vectorizers.values()], format="csr")


def _constant(y: np.ndarray) -> float:
    rate = np.clip(y.mean(), 1e-4, 1 - 1e-4)
    return float(np.log(rate / (1 - rate)))


def _nbsvm(x, y: np.ndarray) -> tuple[np.ndarray, float]:
    """(weights, bias) of NB-SVM's calibrated log-odds for one binary label: a linear SVM on features
    scaled by the log-count ratio r, Platt's sigmoid fitted on 3-fold cross-validated SVM scores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.svm import LinearSVC

    p, q = 1 + np.asarray(x[y].sum(0)).ravel(), 1 + np.asarray(x[~y].sum(0)).ravel()
    r = np.log((p / p.sum()) / (q / q.sum())).astype(np.float32)
    xr = x.multiply(r).tocsr()
    svm = LinearSVC(C=0.01, max_iter=5000, random_state=0)
    scores = cross_val_predict(svm, xr, y, cv=StratifiedKFold(3, shuffle=True, random_state=0),
                               method="decision_function")
    platt = LogisticRegression(C=1e4).fit(scores[:, None], y)
    a, b = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    svm.fit(xr, y)
    return a * svm.coef_[0] * r, a * float(svm.intercept_[0]) + b


def _binary(x, y: np.ndarray, classifier: str) -> tuple[np.ndarray, float]:
    """(weights, bias) of one label's log-odds; a constant when a class has under 3 rows (NB-SVM's
    calibration folds need 3) or none (logistic regression)."""
    from sklearn.linear_model import LogisticRegression

    fewest = min(y.sum(), (~y).sum())
    if fewest < (3 if classifier == "nbsvm" else 1):
        return np.zeros(x.shape[1], np.float32), _constant(y)
    if classifier == "nbsvm":
        return _nbsvm(x, y)
    if classifier == "lr-dense":  # unit-norm sentence vectors: lbfgs at scikit-learn's default C
        clf = LogisticRegression(C=1.0, max_iter=2000).fit(x, y)
        return clf.coef_[0], float(clf.intercept_[0])
    clf = LogisticRegression(C=4.0, max_iter=2000, solver="liblinear", random_state=0).fit(x, y)
    return clf.coef_[0], float(clf.intercept_[0])


def fit_classical(rows: TextRows, labels: np.ndarray, multi_label: bool, name: str = "tfidf-lr",
                  vectors: SentenceVectors | None = None) -> dict:
    """{name, vocabularies, idf, coef (L', d), intercept (L',), link}: one binary model per label
    (multi-label; single-label NB-SVM one-vs-rest, link "ovr"), or one multinomial logistic
    regression (single-label; binary as one logit, link "softmax"). `vectors`: the sentence
    vectors `use-lr` reads (a new SentenceVectors when not given)."""
    from sklearn.linear_model import LogisticRegression

    views, weighting, classifier = CLASSICAL[name]
    vectorizers = {a: _vectorizer(a, n, weighting) for a, n in views.items()}
    for v in vectorizers.values():
        v.fit(classical_text(rows))
    x = _features(vectorizers, rows, weighting, vectors)
    link = "ovr" if multi_label or classifier == "nbsvm" else "softmax"
    if link == "ovr":
        columns = [labels[:, j] > 0 for j in range(labels.shape[1])]
        if not multi_label and labels.shape[1] == 2:  # binary single-label: one model, for class 1
            columns = columns[1:]
        fitted = [_binary(x, y, classifier) for y in columns]
        coef = np.stack([w for w, _ in fitted]).astype(np.float32)
        intercept = np.array([b for _, b in fitted], np.float32)
    else:
        clf = LogisticRegression(C=4.0, max_iter=2000).fit(x, labels.argmax(1))
        coef, intercept = clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)
    idf = [v.idf_ for v in vectorizers.values()] if weighting == "tfidf" else [np.zeros(0)]
    return {"name": name, "link": link, "idf": np.concatenate(idf).astype(np.float32),
            "vocabularies": {a: {t: int(i) for t, i in v.vocabulary_.items()} for a, v in vectorizers.items()},
            "coef": coef, "intercept": intercept}


def classical_probs(model: dict, rows: TextRows, multi_label: bool, vectors: SentenceVectors | None = None) -> np.ndarray:
    """Probabilities (n, L) of a fitted classical model (`vectors` as for fit_classical)."""
    if not len(rows):  # a run without test rows (scikit-learn refuses an empty batch)
        return np.zeros((0, len(model["intercept"]) if multi_label or len(model["intercept"]) > 1 else 2), np.float32)
    views, weighting, _ = CLASSICAL[model["name"]]
    vectorizers, start = {}, 0
    for analyzer, vocabulary in model["vocabularies"].items():
        v = vectorizers[analyzer] = _vectorizer(analyzer, views[analyzer], weighting, vocabulary)
        if weighting == "tfidf":  # the views' idf weights, in view order
            v.idf_, start = model["idf"][start:start + len(vocabulary)], start + len(vocabulary)
    logits = np.asarray(_features(vectorizers, rows, weighting, vectors) @ model["coef"].T) + model["intercept"]
    if multi_label:
        return sigmoid(logits).astype(np.float32)
    if logits.shape[1] == 1:  # a binary model: one logit for class 1
        p1 = sigmoid(logits[:, 0])
        return np.stack([1 - p1, p1], axis=1).astype(np.float32)
    if model["link"] == "ovr":  # one-vs-rest probabilities, normalised
        p = sigmoid(logits)
        return (p / p.sum(1, keepdims=True)).astype(np.float32)
    return to_probs(logits, False).astype(np.float32)


def save_classical(d: Path, model: dict) -> list[Path]:
    from nikl_ray.artifacts import save_npy, write_json

    return [write_json(d / "model.json", {k: model[k] for k in ("name", "link", "vocabularies")})] + [
        save_npy(d / f"model_{k}.npy", model[k]) for k in ("idf", "coef", "intercept")]


def load_classical(d: Path) -> dict:
    model = {k: np.load(d / f"model_{k}.npy", allow_pickle=False) for k in ("idf", "coef", "intercept")}
    if (d / "model.json").exists():
        return model | json.loads((d / "model.json").read_text(encoding="utf-8"))
    # a run made before the word views: a character TF-IDF + logistic regression, its vocabulary alone
    vocabulary = json.loads((d / "model_vocabulary.json").read_text(encoding="utf-8"))
    return model | {"name": "tfidf-lr", "link": "softmax", "vocabularies": {"char_wb": vocabulary}}


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
    model that held it out) and test, from every fold model (`[fold, row, …]`; `test()` picks or
    averages them)."""

    oof_hidden: np.ndarray | None
    oof_probs: np.ndarray
    test_hidden: np.ndarray | None
    test_probs: np.ndarray | None

    def test(self, folds: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
        """(hidden, probs) of the test rows: each from its fold model `folds[row]`, or, without
        `folds` (bagged), the average over every fold model."""
        return tuple(None if x is None else x.mean(0) if folds is None else x[folds, np.arange(x.shape[1])]
                     for x in (self.test_hidden, self.test_probs))


def load_member(layout, member: str, k: int, ids: list[str], test_ids: list[str] | None) -> MemberFeatures:
    """Rows are matched by id; a row with no feature is an error."""
    folds = [read_features(layout.features(member, fold)) for fold in range(k)]

    def gather(parts: list[dict], want: list[str], what: str):
        where = {rid: i for i, rid in enumerate(want)}
        hidden = probs = None
        for got in parts:
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
            raise ValueError(f"features of {member}: some {what} rows have no prediction")
        return hidden, probs

    oof_h, oof_p = gather([f["oof"] for f in folds], ids, "out-of-fold")
    if not test_ids:
        return MemberFeatures(oof_h, oof_p, None, None)
    tests = [gather([f["test"]], test_ids, f"fold {i}'s test") for i, f in enumerate(folds)]  # every fold model, every test row
    test_h = None if tests[0][0] is None else np.stack([h for h, _ in tests])
    return MemberFeatures(oof_h, oof_p, test_h, np.stack([p for _, p in tests]))
