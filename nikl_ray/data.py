"""Read, validate and write task rows.

Readers check every row and collect every problem (file, line, field, what is wrong) before
failing, so one run shows the user all that needs fixing. Nothing is written on failure.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nikl_ray.artifacts import atomic_path, sha256_file
from nikl_ray.tasks import TaskSpec

MAX_LISTED_PROBLEMS = 20
_MISSING = object()


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class DataError(ValueError):
    """Bad input rows; `problems` lists every one found (the message shows the first few)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  … and {more} more" if more > 0 else ""
        super().__init__(f"{len(problems)} bad row(s):\n{shown}{tail}")


@dataclass(frozen=True)
class TextRows:
    """What a model reads of rows: texts, their targets and the targets' spans (None where absent)."""

    texts: list[str]
    targets: list[str | None]
    spans: list[tuple[int, int] | None]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index) -> "TextRows":
        index = list(map(int, index))
        return TextRows([self.texts[i] for i in index], [self.targets[i] for i in index], [self.spans[i] for i in index])

    def keys(self) -> list[str]:
        """A stable key per row, from what the model reads (the same row always gets the same key)."""
        import hashlib

        return [hashlib.sha256(json.dumps([t, g, list(s) if s else None], ensure_ascii=False).encode()).hexdigest()
                for t, g, s in zip(self.texts, self.targets, self.spans)]


@dataclass
class Rows:
    """Validated rows of one task. `labels` is an (n, L) 0/1 matrix, or None for unlabelled rows.
    `spans` holds each target's (begin, end) in its text (None for rows without a target)."""

    task: TaskSpec
    paths: list[Path]
    ids: list[str]
    texts: list[str]
    targets: list[str | None]
    labels: np.ndarray | None
    records: list[Any] = field(repr=False)  # parsed rows as read, written back by the writer
    spans: list[tuple[int, int] | None] | None = None
    _data_hash: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.spans is None:
            self.spans = [None] * len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: Sequence[int] | np.ndarray) -> "Rows":
        index = list(map(int, index))
        return Rows(self.task, self.paths, [self.ids[i] for i in index], [self.texts[i] for i in index],
                    [self.targets[i] for i in index],
                    None if self.labels is None else self.labels[index], [self.records[i] for i in index],
                    [self.spans[i] for i in index], self._data_hash)

    def inputs(self) -> "TextRows":
        return TextRows(self.texts, self.targets, self.spans)

    def data_hash(self) -> str:
        """Hash of the files these rows were read from (fold manifests are tied to it); read once."""
        import hashlib

        if self._data_hash is None:
            self._data_hash = hashlib.sha256("".join(sha256_file(p) for p in self.paths).encode()).hexdigest()
        return self._data_hash


def _get(obj: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def _parse_target(record: dict, task: TaskSpec, text: str) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(target form, (begin, end), problem) for a record; a missing or all-null target is valid (whole text)."""
    target = _get(record, f"input.{task.target_field}") if task.format == "nikl" else _get(record, task.target_field)
    if target is _MISSING or target is None:
        return None, None, None
    if isinstance(target, str) and task.format == "jsonl":  # a keyword or aspect: the text need not contain it
        return (target, first_span(text, target), None) if target else (None, None, None)
    if not isinstance(target, dict):
        return None, None, f"target: expected an object {{form, begin, end}}, got {type(target).__name__}"
    form, begin, end = target.get("form"), target.get("begin"), target.get("end")
    if form is None:
        return None, None, None
    if not isinstance(form, str):
        return None, None, f"target.form: expected a string or null, got {type(form).__name__}"
    problem = span_problem(text, form, begin, end)
    return (None, None, problem) if problem else (form, (begin, end), None)


def first_span(text: str, target: str) -> tuple[int, int] | None:
    """Where a target given without a span first occurs in its text (None: nowhere)."""
    begin = text.find(target) if target else -1
    return (begin, begin + len(target)) if begin >= 0 else None


def span_problem(text: str, form: str, begin, end) -> str | None:
    """Why (form, begin, end) is not a span of `text`, or None."""
    if not (isinstance(begin, int) and isinstance(end, int)) or isinstance(begin, bool) or isinstance(end, bool):
        return f"target: begin/end must be integers when form is set (got {begin!r}, {end!r})"
    if not (0 <= begin <= end <= len(text)) or text[begin:end] != form:
        return (f"target span [{begin}:{end}] does not match form[{begin}:{end}]: "
                f"expected {form!r}, found {text[begin:end]!r}")
    return None


def _parse_labels(value: Any, task: TaskSpec) -> tuple[np.ndarray | None, str | None]:
    vec = np.zeros(len(task.labels), dtype=np.float32)
    if task.format == "nikl":
        if not isinstance(value, dict):
            return None, f"{task.label_field}: expected an object of label → \"True\"/\"False\""
        unknown = sorted(set(value) - set(task.labels))
        missing = [lab for lab in task.labels if lab not in value]
        if unknown:
            return None, f"{task.label_field}: unknown label(s) {unknown}; expected {task.labels}"
        if missing:
            return None, f"{task.label_field}: missing label(s) {missing}"
        for j, lab in enumerate(task.labels):
            v = value[lab]
            if v not in ("True", "False"):
                return None, f"{task.label_field}.{lab}: expected \"True\" or \"False\", got {v!r}"
            vec[j] = v == "True"
        return vec, None
    names = value if task.multi_label else [value]
    if task.multi_label and not isinstance(value, list):
        return None, f"{task.label_field}: expected a list of label names, got {value!r}"
    for name in names:
        if isinstance(name, str) and name.isdigit() and not task.multi_label and name not in task.labels:
            name = int(name)  # tsv/jsonl single-label rows often hold the class index ("0"/"1")
        if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < len(task.labels):
            vec[name] = 1
        elif isinstance(name, str) and name in task.labels:
            vec[task.labels.index(name)] = 1
        else:
            return None, f"{task.label_field}: unknown label {name!r}; expected one of {task.labels}"
    return vec, None


def _iter_records(path: Path, task: TaskSpec, problems: list[Problem]):
    """Yield (line number, record) pairs; unparsable lines become problems."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        problems.append(Problem(str(path), 0, f"cannot read file: {e}"))
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        problems.append(Problem(str(path), line, f"not UTF-8 text ({e.reason})"))
        return
    lines = text.splitlines()
    if task.format == "tsv":
        if not lines:
            return
        header = lines[0].split("\t")
        for col in (task.id_field, task.text_field):
            if col not in header:
                problems.append(Problem(str(path), 1, f"header has no column {col!r} (found {header})"))
                return
        for n, row in enumerate(csv.reader(lines[1:], delimiter="\t", quoting=csv.QUOTE_NONE), start=2):
            if not row:
                continue
            if len(row) != len(header):
                problems.append(Problem(str(path), n, f"expected {len(header)} tab-separated columns, found {len(row)}"))
                continue
            yield n, dict(zip(header, row))
        return
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), n, f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(record, dict):
            problems.append(Problem(str(path), n, f"expected a JSON object, got {type(record).__name__}"))
            continue
        yield n, record


def read_rows(paths: str | Path | Sequence[str | Path], task: TaskSpec, *, labelled: bool | None = None) -> Rows:
    """Read and validate rows from one or more files of `task`'s format.

    labelled: True requires labels on every row, False ignores them (test files), None takes
    labels when the first row has them and then requires them on every row. A generate task's
    rows are read by nikl_ray/qa/data.py (QARows: references in place of labels).
    """
    if task.generates:
        from nikl_ray.qa.data import read_qa_rows

        return read_qa_rows(paths, task, labelled=labelled)
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    problems: list[Problem] = []
    ids, texts, targets, spans, labels, records = [], [], [], [], [], []
    first_seen: dict[str, str] = {}
    text_key = f"input.{task.text_field}" if task.format == "nikl" else task.text_field
    for path in paths:
        if not path.exists():
            problems.append(Problem(str(path), 0, "file not found"))
            continue
        for n, rec in _iter_records(path, task, problems):
            where = f"{path}:{n}"
            bad = lambda msg: problems.append(Problem(str(path), n, msg))  # noqa: E731
            rid, text = _get(rec, task.id_field), _get(rec, text_key)
            if rid is _MISSING or not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
                bad(f"{task.id_field}: missing or not a string/integer")
                continue
            rid = str(rid)
            if rid in first_seen:
                bad(f"duplicate id {rid!r} (first seen at {first_seen[rid]})")
                continue
            first_seen[rid] = where
            if not isinstance(text, str):
                bad(f"{text_key}: missing or not a string")
                continue
            target, span, problem = _parse_target(rec, task, text) if task.target_field else (None, None, None)
            if problem:
                bad(problem)
                continue
            label_value = _get(rec, task.label_field)
            if labelled is None:
                labelled = label_value is not _MISSING and label_value not in ("", None)
            vec = None
            if labelled:
                if label_value is _MISSING or label_value in ("", None):
                    bad(f"{task.label_field}: missing (the file's first row has labels)")
                    continue
                vec, problem = _parse_labels(label_value, task)
                if problem:
                    bad(problem)
                    continue
                if not task.multi_label and vec.sum() != 1:
                    bad(f"{task.label_field}: a single-label task needs exactly one label")
                    continue
            ids.append(rid)
            texts.append(text)
            targets.append(target)
            spans.append(span)
            labels.append(vec)
            records.append(rec)
    if not problems and not ids:
        problems.append(Problem(", ".join(map(str, paths)), 0, "no rows"))
    if problems:
        raise DataError(problems)
    return Rows(task, paths, ids, texts, targets, np.stack(labels) if labelled else None, records, spans)


def write_predictions(rows: Rows, decisions: np.ndarray, path: str | Path) -> Path:
    """Write rows back in the task's own format with `decisions` ((n, L) bool) as their labels.

    Same ids, same order; atomic (a temporary file renamed when complete).
    """
    task = rows.task
    decisions = np.asarray(decisions, dtype=bool)
    if decisions.shape != (len(rows), len(task.labels)):
        raise ValueError(f"decisions have shape {decisions.shape}, expected {(len(rows), len(task.labels))}")
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        if task.format == "tsv":
            f.write(f"{task.id_field}\t{task.text_field}\t{task.label_field}\n")
            for rid, rec, dec in zip(rows.ids, rows.records, decisions):
                f.write(f"{rid}\t{rec[task.text_field]}\t{int(dec.argmax())}\n")
        else:
            for rec, dec in zip(rows.records, decisions):
                out = dict(rec)
                if task.format == "nikl":
                    out[task.label_field] = {lab: str(bool(d)) for lab, d in zip(task.labels, dec)}
                else:
                    names = [lab for lab, d in zip(task.labels, dec) if d]
                    out[task.label_field] = names if task.multi_label else names[0]
                f.write(json.dumps(out, ensure_ascii=False) + "\n")
    return path
