"""The features stage: what every fold model says about the rows it never saw, and the test rows.

For each (member, fold): the out-of-fold rows (its own held-out fold) and the test rows, as
row ids + probabilities (+ the pooled last hidden state for neural members: the first token
for encoders, the last real token for decoders, right for left- and right-padding alike).
Saved as `.npy` (loaded with allow_pickle=False) + ids in JSON, so members are always joined
by id, never by position. One Ray task per (member, fold), with the trial's GPU share.

The classical member (`tfidf-lr`: character 1–4-gram TF-IDF + one-vs-rest logistic
regression, scikit-learn) is trained per fold right here: it is cheap and diverse.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from nikl_ray.artifacts import atomic_path, load_manifest, manifest_problem, sha256_file, write_json, write_manifest
from nikl_ray.backbones import BackboneSpec, load_for_classification, quiet_transformers
from nikl_ray.config import Experiment
from nikl_ray.data import Rows
from nikl_ray.metrics import sigmoid, softmax
from nikl_ray.train import HF_CHECKPOINT, encode, pair_dir

CLASSICAL = "tfidf-lr"


def member_names(exp: Experiment) -> list[str]:
    return [b.name for b in exp.backbones] + ([CLASSICAL] if exp.classical else [])


def feature_dir(exp: Experiment, member: str, fold: int) -> Path:
    return exp.results / "features" / member / f"fold{fold}"


# ---------------------------------------------------------------------------- neural members
def load_trained(spec: BackboneSpec, checkpoint_dir: str | Path, num_labels: int, multi_label: bool):
    """(tokenizer, model) of a trained fold checkpoint: the full model, or base + LoRA adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)  # saved with its marker tokens
    if spec.uses_lora:
        problem = "multi_label_classification" if multi_label else "single_label_classification"
        model = load_for_classification(spec, num_labels, problem, tokenizer, adapter_dir=str(checkpoint_dir))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint_dir)
    return tokenizer, model.eval()


def pool(hidden, attention_mask, family: str):
    """First token for encoders; the last real token for decoders, whichever side was padded."""
    import torch

    if family == "encoder":
        first = attention_mask.float().argmax(1)  # first real token (0 under right padding)
        return hidden[torch.arange(len(hidden)), first]
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(1)
    return hidden[torch.arange(len(hidden)), last]


def embed(spec: BackboneSpec, tokenizer, model, texts: list[str], targets: list, multi_label: bool,
          batch_size: int = 64, progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pooled hidden states, probabilities) of rows, in their given order; batches sorted by length.
    With `progress`, a line prefixed by it every tenth of the rows (when there are ten batches or more)."""
    import torch
    from transformers import DataCollatorWithPadding

    enc = encode(tokenizer, spec, texts, targets)
    order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    hidden_out, prob_out = [None] * len(texts), [None] * len(texts)
    every = len(order) // 10  # rows between progress lines (none for fewer than ten batches)
    t0 = time.time()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            if progress and every >= batch_size and start and start % every < batch_size:
                print(f"{progress}: {start}/{len(order)} rows, {time.time() - t0:.0f} s", flush=True)
            idx = order[start:start + batch_size]
            batch = collate([{k: enc[k][i] for k in enc} for i in idx]).to(device)
            out = model(**batch, output_hidden_states=True)
            pooled = pool(out.hidden_states[-1], batch["attention_mask"], spec.family).float().cpu().numpy()
            logits = out.logits.float().cpu().numpy()
            probs = sigmoid(logits) if multi_label else softmax(logits)
            for j, i in enumerate(idx):
                hidden_out[i], prob_out[i] = pooled[j], probs[j]
    return np.stack(hidden_out), np.stack(prob_out)


def _neural_features(job: dict) -> dict:
    """Ray task: embed the held-out fold and the test rows with one trained fold model."""
    import torch

    if torch.cuda.is_available() and 0 < job.get("gpu_share", 1) < 1:
        torch.cuda.set_per_process_memory_fraction(job["gpu_share"])
    spec = BackboneSpec(**job["backbone"])
    tokenizer, model = load_trained(spec, job["checkpoint"], job["num_labels"], job["multi_label"])
    if torch.cuda.is_available():
        model.to("cuda")
    out = {}
    for part in ("oof", "test"):
        if job[part] is None:
            continue
        t0 = time.time()
        label = f"features {spec.name} fold {job['fold']} {part}"
        hidden, probs = embed(spec, tokenizer, model, job[part]["texts"], job[part]["targets"], job["multi_label"],
                              progress=label)
        out[part] = {"ids": job[part]["ids"], "hidden": hidden, "probs": probs}
        print(f"{label}: {len(hidden)} rows in {time.time() - t0:.1f} s", flush=True)
    return out


# ---------------------------------------------------------------------------- classical member
def classical_text(texts: list[str], targets: list) -> list[str]:
    return [f"{t} | {g}" if g else t for t, g in zip(texts, targets)]


def classical_vectorizer(vocabulary: dict | None = None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), min_df=2, sublinear_tf=True, max_features=300_000,
                           vocabulary=vocabulary)


def classical_predict(d: Path, texts: list[str], targets: list, multi_label: bool) -> np.ndarray:
    """Probabilities from a saved classical fold model (vocabulary JSON + arrays)."""
    vec = classical_vectorizer(json.loads((d / "model_vocabulary.json").read_text(encoding="utf-8")))
    vec.idf_ = np.load(d / "model_idf.npy", allow_pickle=False)
    logits = vec.transform(classical_text(texts, targets)) @ np.load(d / "model_coef.npy", allow_pickle=False).T
    logits = logits + np.load(d / "model_intercept.npy", allow_pickle=False)
    return sigmoid(logits) if multi_label else softmax(logits)


def _classical_features(job: dict) -> dict:
    """Ray task: fit char n-gram TF-IDF + logistic regression on one fold's training rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    t0 = time.time()
    vec = classical_vectorizer()
    x = vec.fit_transform(classical_text(job["train"]["texts"], job["train"]["targets"]))
    y = np.asarray(job["train"]["labels"])
    if job["multi_label"]:
        clf = OneVsRestClassifier(LogisticRegression(C=4.0, max_iter=2000, solver="liblinear")).fit(x, y)
    else:
        clf = LogisticRegression(C=4.0, max_iter=2000).fit(x, y.argmax(1))
    estimators = clf.estimators_ if job["multi_label"] else [clf]
    coef = np.concatenate([e.coef_ for e in estimators]).astype(np.float32)
    intercept = np.concatenate([e.intercept_ for e in estimators]).astype(np.float32)
    # Kept as plain arrays + a JSON vocabulary (no pickle), for `nikl-ray predict --text`.
    out = {"model": {"vocabulary": {t: int(i) for t, i in vec.vocabulary_.items()}, "idf": vec.idf_.astype(np.float32),
                     "coef": coef, "intercept": intercept}}
    for part in ("oof", "test"):
        if job[part] is not None:
            probs = clf.predict_proba(vec.transform(classical_text(job[part]["texts"], job[part]["targets"])))
            out[part] = {"ids": job[part]["ids"], "hidden": None, "probs": np.asarray(probs, dtype=np.float32)}
    print(f"features {CLASSICAL} fold {job['fold']}: fitted and predicted in {time.time() - t0:.1f} s", flush=True)
    return out


# ---------------------------------------------------------------------------- the stage
def _payload(rows: Rows | None, idx=None) -> dict | None:
    if rows is None:
        return None
    r = rows if idx is None else rows.take(idx)
    return {"ids": r.ids, "texts": r.texts, "targets": r.targets,
            "labels": None if r.labels is None else r.labels.tolist()}


def _save_npy(path: Path, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array.astype(np.float32), allow_pickle=False)
    return path


def _save(d: Path, out: dict, inputs: dict) -> None:
    files = []
    model = out.pop("model", None)
    if model is not None:
        files.append(write_json(d / "model_vocabulary.json", model.pop("vocabulary")))
        files += [_save_npy(d / f"model_{k}.npy", v) for k, v in model.items()]
    for part, arrays in out.items():
        write_json(d / f"{part}_ids.json", arrays["ids"])
        files.append(d / f"{part}_ids.json")
        for key in ("hidden", "probs"):
            if arrays[key] is not None:
                files.append(_save_npy(d / f"{part}_{key}.npy", arrays[key]))
    write_manifest(d, inputs=inputs, files=files)


def features_stage(exp: Experiment, rows: Rows, folds: dict, test: Rows | None) -> Path:
    """Write features of every (member, fold) not already done. Returns the features root."""
    import ray

    from nikl_ray.cluster import cluster_resources
    from nikl_ray.train import plan_placements

    cpus, gpus = cluster_resources()
    use_gpu = exp.resources.use_gpu if exp.resources.use_gpu is not None else gpus > 0
    plans = plan_placements(exp, use_gpu)
    test_hash = test.data_hash() if test is not None else None
    pending = {}
    for member in member_names(exp):
        for fold in range(folds["k"]):
            held = set(folds["folds"][fold])
            oof_idx = [i for i, rid in enumerate(rows.ids) if rid in held]
            d = feature_dir(exp, member, fold)
            if member == CLASSICAL:
                inputs = {"member": member, "data_hash": folds["data_hash"], "fold": fold, "test_hash": test_hash,
                          "task": exp.task.model_dump(mode="json")}
                job = {"fold": fold, "multi_label": exp.task.multi_label, "oof": _payload(rows, oof_idx), "test": _payload(test),
                       "train": _payload(rows, [i for i, rid in enumerate(rows.ids) if rid not in held])}
                fn, opts = _classical_features, {"num_cpus": 1}
            else:
                spec = exp.backbone(member)
                train_manifest = load_manifest(pair_dir(exp, member, fold))
                # the train manifest vouches for the weights' checksums: new weights, new features
                inputs = {"member": member, "train_manifest": sha256_file(pair_dir(exp, member, fold) / "manifest.json"),
                          "test_hash": test_hash}
                job = {"fold": fold, "backbone": spec.model_dump(mode="json"), "num_labels": len(exp.task.labels),
                       "multi_label": exp.task.multi_label, "gpu_share": plans[member].gpu_share,
                       "checkpoint": str(pair_dir(exp, member, fold) / train_manifest["best_checkpoint"]),
                       "oof": _payload(rows, oof_idx), "test": _payload(test)}
                p = plans[member]
                fn, opts = _neural_features, {"num_cpus": p.cpus, "num_gpus": p.gpu_share}
            why = manifest_problem(d, inputs)
            if why is None:
                continue
            print(f"features {member} fold {fold}: {why} → computing", flush=True)
            pending[ray.remote(**opts)(fn).remote(job)] = (d, inputs)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        d, inputs = pending.pop(done[0])
        _save(d, ray.get(done[0]), inputs)
    return exp.results / "features"


def load_member(exp: Experiment, member: str, k: int, ids: list[str], test_ids: list[str] | None):
    """(oof hidden | None, oof probs) aligned to `ids`, and per fold [(test hidden | None, test probs)].

    Rows are matched by id; a row missing from the out-of-fold features is an error.
    """
    where = {rid: i for i, rid in enumerate(ids)}
    oof_h, oof_p, test_parts = None, None, []
    for fold in range(k):
        d = feature_dir(exp, member, fold)
        fold_ids = json.loads((d / "oof_ids.json").read_text())
        idx = np.array([where[r] for r in fold_ids])
        probs = np.load(d / "oof_probs.npy", allow_pickle=False)
        hidden = np.load(d / "oof_hidden.npy", allow_pickle=False) if (d / "oof_hidden.npy").exists() else None
        if oof_p is None:
            oof_p = np.full((len(ids), probs.shape[1]), np.nan, dtype=np.float32)
            oof_h = None if hidden is None else np.full((len(ids), hidden.shape[1]), np.nan, dtype=np.float32)
        oof_p[idx] = probs
        if hidden is not None:
            oof_h[idx] = hidden
        if test_ids is not None:
            t_where = {rid: i for i, rid in enumerate(json.loads((d / "test_ids.json").read_text()))}
            t_idx = np.array([t_where[r] for r in test_ids])
            t_h = np.load(d / "test_hidden.npy", allow_pickle=False)[t_idx] if (d / "test_hidden.npy").exists() else None
            test_parts.append((t_h, np.load(d / "test_probs.npy", allow_pickle=False)[t_idx]))
    if np.isnan(oof_p).any():
        raise ValueError(f"features of {member}: some rows have no out-of-fold prediction")
    return oof_h, oof_p, test_parts
