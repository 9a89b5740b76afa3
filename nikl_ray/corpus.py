"""Unlabeled text for pretraining: the files users have, read into NFC-normalised, deduplicated lines.

Formats (by `format`, else by the file): JSON Lines (`field`, a dotted path; by default `text`,
NIKL's `input.form`, `document`, `review` or `form`, whichever a row has), tsv/csv with a header
(`field` is the column; by default `document` or `text`, NSMC style), and plain text, one text
a line. `field` may list several fields or columns (a QA file's phrasings: `[질문_1, 질문_2]`); a
JSON field holding a list of strings gives each. A `.txt` whose first line is a tab-separated header is read as tsv.
"""

from __future__ import annotations

import csv
import hashlib
import json
import unicodedata
from pathlib import Path

from nikl_ray.artifacts import sha256_file

JSON_FIELDS = ("text", "input.form", "document", "review", "form")
COLUMNS = ("document", "text", "review", "form")


def _format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in (".tsv", ".csv"):
        return suffix[1:]
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    return "tsv" if "\t" in first and any(c in first.rstrip("\n").split("\t") for c in COLUMNS) else "lines"


def _get(obj, dotted: str) -> list[str]:
    """The texts at a dotted path: a string, or each string of a list (a QA row's phrasings)."""
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return []
        obj = obj[key]
    return [obj] if isinstance(obj, str) else [t for t in obj if isinstance(t, str)] if isinstance(obj, list) else []


def _texts(path: Path, fmt: str, field: str | list[str] | None):
    fields = [field] if isinstance(field, str) else field
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "lines":
            yield from f
        elif fmt == "jsonl":
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    if fields:
                        yield from (t for k in fields for t in _get(row, k))
                    else:
                        yield next((t for k in JSON_FIELDS for t in _get(row, k) if t), None)
        else:
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",",
                                    quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
            header = reader.fieldnames or []
            columns = fields or [next((c for c in COLUMNS if c in header), None)]
            if not [c for c in columns if c in header]:
                raise ValueError(f"{path}: no column {' / '.join(fields or COLUMNS)} in its header {header}")
            for row in reader:
                yield from (row.get(c) for c in columns if c in header)


def read_corpus(sources: list, exclude: list[Path] = ()) -> tuple[list[str], dict]:
    """(texts, what was read): every source's texts, NFC-normalised and stripped, empty ones and
    repeats dropped (first occurrence kept); sources in `exclude` are left out and listed."""
    excluded = {Path(p).resolve() for p in exclude}
    texts: dict[str, None] = {}
    info = {"sources": {}, "left_out": [], "read": 0}
    for source in sources:
        path = Path(source.path).resolve()
        if path in excluded:
            info["left_out"].append(str(path))
            continue
        n = 0
        for text in _texts(path, _format(path, source.format), source.field):
            text = unicodedata.normalize("NFC", text or "").strip()
            if text:
                texts.setdefault(text, None)
                n += 1
        info["sources"][str(path)] = n
        info["read"] += n
    info["unique"] = len(texts)
    return list(texts), info


def split_heldout(texts: list[str], share: float, seed: int, cap: int = 2000) -> tuple[list[str], list[str]]:
    """(train, held-out) texts: a seeded, stable slice of `share` (at most `cap`) for perplexity."""
    ranked = sorted(texts, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    n = min(cap, max(1, int(round(share * len(texts))))) if share > 0 and len(texts) > 10 else 0
    held = set(ranked[:n])
    return [t for t in texts if t not in held], [t for t in texts if t in held]


def corpus_hash(sources: list, exclude: list[Path] = ()) -> str:
    """What the corpus is made of: its files' contents and how each is read."""
    excluded = {Path(p).resolve() for p in exclude}
    parts = [f"{Path(s.path).resolve()}|{s.format}|{s.field}|{sha256_file(s.path)}" for s in sources
             if Path(s.path).resolve() not in excluded]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def pretrain_corpus(exp, spec) -> tuple[list[str], dict]:
    """The texts `spec` pretrains on (the task's test file left out unless `include_test`)."""
    return read_corpus(spec.pretrain.corpus, exclude=[] if spec.pretrain.include_test or not exp.test else [exp.test])
