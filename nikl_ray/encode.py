"""Rows → token ids, with the target span marked as the backbone's `target_encoding` says.

- inline:  `…<t1>target<t2>…` at the target's own position (`[begin:end]`), so a target that
           occurs twice in the text is still the one meant; a row without a target gets
           `<t1><t2>` at the start, and a target its text does not contain `<t1>target<t2>` at the
           start. A row too long for `max_length` keeps a window of the text centred on the span,
           so the target is never cut away.
- markers: `{text}` + `<t1>{target}<t2>` as a second segment (an empty span without a target).
- pair:    (text, target) as a sentence pair.
- none:    the text alone.

For markers and pair, truncation trims the longer segment first, so a long text never pushes
the target out. Tokenized rows are HF `datasets` (what Trainer and the collator expect).
"""

from __future__ import annotations

import numpy as np

from nikl_ray.backbones import MARKERS, BackboneSpec
from nikl_ray.data import TextRows


def inline_text(text: str, span: tuple[int, int] | None, target: str | None = None) -> str:
    if span is None:  # no target, or one the text does not contain (a keyword): marked ahead of the text
        return f"{MARKERS[0]}{target or ''}{MARKERS[1]}{text}"
    b, e = span
    return f"{text[:b]}{MARKERS[0]}{text[b:e]}{MARKERS[1]}{text[e:]}"


def _centred_window(tokenizer, text: str, max_length: int) -> str:
    """The part of an inline-marked text whose tokens fit `max_length` with the markers near the middle."""
    budget = max_length - len(tokenizer("")["input_ids"])  # room left by the special tokens
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if len(ids) <= budget:
        return text
    t1, t2 = (tokenizer.convert_tokens_to_ids(m) for m in MARKERS)
    p0 = ids.index(t1) if t1 in ids else 0
    p1 = ids.index(t2) if t2 in ids else p0
    start = max(0, min(p0 - (budget - (p1 - p0 + 1)) // 2, len(ids) - budget))
    end = min(len(ids), start + budget)
    return text[offsets[start][0]:offsets[end - 1][1]]


def encode(tokenizer, spec: BackboneSpec, rows: TextRows) -> dict:
    """Token ids (and attention masks) of rows, at most `spec.max_length` tokens each."""
    kw = dict(max_length=spec.max_length)
    if spec.target_encoding == "none":
        return dict(tokenizer(rows.texts, truncation=True, **kw))
    if spec.target_encoding == "inline":
        texts = [inline_text(t, s, g) for t, s, g in zip(rows.texts, rows.spans, rows.targets)]
        texts = [_centred_window(tokenizer, t, spec.max_length) for t in texts]
        return dict(tokenizer(texts, truncation=True, **kw))
    if spec.target_encoding == "markers":
        second = [f"{MARKERS[0]}{t or ''}{MARKERS[1]}" for t in rows.targets]
    else:
        second = [t or "" for t in rows.targets]
    return dict(tokenizer(rows.texts, second, truncation="longest_first", **kw))


def to_dataset(tokenizer, spec: BackboneSpec, rows: TextRows, labels: np.ndarray | None = None, multi_label: bool = True,
               soft: bool = False):
    """A `datasets.Dataset` of tokenized rows; `labels` ((n, L) 0/1) become float vectors
    (multi-label, for BCE) or class indices (single-label, for cross-entropy); `soft` labels
    (probabilities, a student's targets) stay float vectors either way."""
    import datasets

    datasets.utils.logging.disable_progress_bar()  # a map over in-memory rows takes well under a second
    columns = {"text": rows.texts, "target": rows.targets, "span": [list(s) if s else None for s in rows.spans]}
    if labels is not None:
        columns["labels"] = (labels.astype(np.float32).tolist() if multi_label or soft
                             else labels.argmax(1).astype(int).tolist())

    def tokenize(batch):
        return encode(tokenizer, spec, TextRows(batch["text"], batch["target"],
                                                [tuple(s) if s else None for s in batch["span"]]))

    return datasets.Dataset.from_dict(columns).map(tokenize, batched=True, remove_columns=["text", "target", "span"])
