"""Read, validate and write question-answering rows (`generate` tasks).

An item is one question in one or more phrasings, an optional context passage, its reference
answers (none for unlabelled rows) and an optional group (category). As `nikl_ray.data` does for
classification rows, the readers check every row and collect every problem (file, line, field,
what is wrong) before failing with one `DataError`; reading writes nothing.

Formats (`TaskSpec.format`):

- `csv`: a header line and one item a row (the Python csv module: cells may hold newlines; a
  row's line is the physical line it starts on). Every question column present and non-empty is a
  phrasing, in `question_fields` order; every answer column present and non-empty a reference.
- `jsonl`: one object a line; a question or answer field holds a string or a list of strings
  (answers may also be KorQuAD-style `[{"text": …}, …]`); context and group fields are strings.
- `squad`: one SQuAD / KorQuAD JSON document a file (`data → paragraphs → {context, qas → {id,
  question, answers → text}}`); the paragraph's context is the context and the article's title
  the group. It has no meaningful lines: a problem is at `path:0` and names its JSON path
  (`data[3].paragraphs[1].qas[0].question`).

Phrasings and references are stripped of surrounding whitespace; an empty one is absent.
Submissions (`write_answers`, `write_vectors`) keep the rows' ids and order and are atomic.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from nikl_ray.artifacts import atomic_path, sha256_file
from nikl_ray.data import _MISSING, DataError, Problem
from nikl_ray.tasks import GENERATE_FORMATS, TaskSpec

__all__ = ["QARows", "Query", "queries", "test_queries", "read_qa_rows", "write_answers", "write_vectors"]



@dataclass(frozen=True)
class Query:
    """One phrasing of one item: what a model is asked. `item` is the row's position in its QARows."""

    id: str
    item: int
    question: str
    context: str | None


@dataclass
class QARows:
    """Validated question-answering items of one task.

    `questions[i]` holds item i's phrasings (at least one), `answers[i]` its references (at least
    one; `answers` is None for unlabelled rows), `contexts[i]` / `groups[i]` None where absent.
    """

    task: TaskSpec
    paths: list[Path]
    ids: list[str]
    questions: list[list[str]]
    contexts: list[str | None]
    answers: list[list[str]] | None
    groups: list[str | None]
    records: list[dict] = field(repr=False)  # parsed rows as read
    _data_hash: str | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: Sequence[int] | np.ndarray) -> "QARows":
        index = list(map(int, index))
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        return QARows(self.task, self.paths, pick(self.ids), pick(self.questions), pick(self.contexts),
                      None if self.answers is None else pick(self.answers), pick(self.groups), pick(self.records),
                      self._data_hash)

    def data_hash(self) -> str:
        """Hash of the files these rows were read from (fold manifests are tied to it); read once."""
        if self._data_hash is None:
            self._data_hash = hashlib.sha256("".join(sha256_file(p) for p in self.paths).encode()).hexdigest()
        return self._data_hash

    def strata(self) -> np.ndarray:
        """An int per row for stratified folds: its group's, by name, and one more for rows without
        a group; all zeros when the task has no group field (folds.item_strata merges rare ones)."""
        if not self.task.group_field:
            return np.zeros(len(self), dtype=np.int64)
        code = {g: i for i, g in enumerate(sorted({g for g in self.groups if g is not None}))}
        return np.array([code.get(g, len(code)) for g in self.groups], dtype=np.int64)

    def queries(self, index: Sequence[int] | np.ndarray | None = None) -> list[Query]:
        """One Query per phrasing of the given rows (all by default), in row order;
        ids are `f"{item_id}#q{j}"` for phrasing j."""
        return queries(self.ids, self.questions, self.contexts, index)


def test_queries(ids, questions, contexts, index=None) -> list[Query]:
    """Test items as Queries: a test item gets one answer, to its first phrasing."""
    return queries(ids, questions, contexts, index, first_only=True)


def queries(ids, questions, contexts, index=None, *, first_only: bool = False) -> list[Query]:
    """Every phrasing (or the first only) of the items at `index` (all by default) as a Query, in row
    order: of QARows, or of the lists a worker's payload carries."""
    items = range(len(ids)) if index is None else map(int, index)
    return [Query(f"{ids[i]}#q{j}", i, q, contexts[i])
            for i in items for j, q in enumerate(questions[i][:1] if first_only else questions[i])]


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    """One item as a reader found it, before validation: (field name, value) pairs. The names are
    what problems call the fields (csv columns, jsonl fields, squad JSON paths)."""

    path: Path
    line: int
    where: str  # how a later duplicate names this item's place
    record: dict
    id: tuple[str, Any]
    questions: list[tuple[str, Any]]
    answers: list[tuple[str, Any]] | None  # None: the file cannot hold answers and already said so
    answer_names: str
    context: tuple[str, Any] | None = None
    group: tuple[str, Any] | None = None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _lookup(obj: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def _strings(name: str, value: Any, bad: list[str], *, answer: bool = False) -> list[str]:
    """The non-empty stripped strings a question/answer field holds; wrong types go to `bad`."""
    if value is _MISSING or value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if answer and isinstance(value, dict) and "text" in value:  # HF datasets' squad: {"text": [...], ...}
        return _strings(f"{name}.text", value["text"], bad, answer=True)
    if not isinstance(value, list):
        what = "a string, a list of strings or of {text} objects" if answer else "a string or a list of strings"
        bad.append(f"{name}: expected {what}, got {_kind(value)}")
        return []
    out = []
    for k, v in enumerate(value):
        if answer and isinstance(v, dict):
            v, sub = v.get("text", _MISSING), f"{name}[{k}].text"
            if not isinstance(v, str):
                bad.append(f"{sub}: missing or not a string (got {_kind(v) if v is not _MISSING else 'nothing'})")
                continue
        elif not isinstance(v, str):
            what = "a string or a {text} object" if answer else "a string"
            bad.append(f"{name}[{k}]: expected {what}, got {_kind(v)}")
            continue
        if v.strip():
            out.append(v.strip())
    return out


def _optional_string(pair: tuple[str, Any] | None, bad: list[str]) -> str | None:
    if pair is None:
        return None
    name, value = pair
    if value is _MISSING or value is None:
        return None
    if not isinstance(value, str):
        bad.append(f"{name}: expected a string, got {_kind(value)}")
        return None
    return value if value.strip() else None


def _has_answers(raw: _Raw) -> bool:
    """Whether a row holds anything meant as an answer (decides `labelled` on the first row)."""
    if not raw.answers:
        return False
    return any(v is not _MISSING and v is not None and v != [] and not (isinstance(v, str) and not v.strip())
               for _, v in raw.answers)


class _Collector:
    def __init__(self, task: TaskSpec, labelled: bool | None, problems: list[Problem]):
        self.task, self.labelled, self.problems = task, labelled, problems
        self.decided_by_first_row = labelled is None
        self.first_seen: dict[str, str] = {}
        self.ids, self.questions, self.contexts, self.answers, self.groups, self.records = [], [], [], [], [], []

    def add(self, raw: _Raw) -> None:
        bad: list[str] = []
        id_name, rid = raw.id
        if rid is _MISSING or rid is None or (isinstance(rid, str) and not rid.strip()):
            bad.append(f"{id_name}: missing or empty")
            rid = None
        elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
            bad.append(f"{id_name}: expected a string or an integer, got {_kind(rid)}")
            rid = None
        else:
            rid = str(rid)
            if rid in self.first_seen:
                bad.append(f"{id_name}: duplicate id {rid!r} (first seen at {self.first_seen[rid]})")
            else:
                self.first_seen[rid] = raw.where
        n_bad = len(bad)
        questions = [q for name, value in raw.questions for q in _strings(name, value, bad)]
        if not questions and len(bad) == n_bad:
            names = "/".join(name for name, _ in raw.questions) or "/".join(self.task.question_fields)
            bad.append(f"{names}: no non-empty question")
        context = _optional_string(raw.context, bad)
        group = _optional_string(raw.group, bad)
        if self.labelled is None:
            self.labelled = _has_answers(raw)
        answers = None
        if self.labelled and raw.answers is not None:
            n_bad = len(bad)
            answers = [a for name, value in raw.answers for a in _strings(name, value, bad, answer=True)]
            if not answers and len(bad) == n_bad:
                why = " (the first row has answers)" if self.decided_by_first_row else ""
                bad.append(f"{raw.answer_names}: no non-empty reference answer{why}")
        for message in bad:
            self.problems.append(Problem(str(raw.path), raw.line, message))
        if bad:
            return
        self.ids.append(rid)
        self.questions.append(questions)
        self.contexts.append(context)
        self.answers.append(answers)
        self.groups.append(group)
        self.records.append(raw.record)


def _read_text(path: Path, problems: list[Problem]) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as e:
        problems.append(Problem(str(path), 0, f"cannot read file: {e}"))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        problems.append(Problem(str(path), line, f"not UTF-8 text ({e.reason} at byte {e.start})"))
        return None
    return text[1:] if text.startswith("\ufeff") else text  # a byte-order mark (Excel's csv) is no part of the data


def _csv_items(path: Path, text: str, task: TaskSpec, collector: _Collector) -> Iterator[_Raw]:
    problems = collector.problems
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        problems.append(Problem(str(path), 1, f"header: malformed csv ({e})"))
        return
    header = [h.strip() for h in header]
    question_cols = [q for q in task.question_fields if q in header]
    if task.id_field not in header or not question_cols:
        missing = [] if task.id_field in header else [f"no id column {task.id_field!r}"]
        if not question_cols:
            missing.append(f"none of the question columns {task.question_fields}")
        problems.append(Problem(str(path), 1, f"header: {'; '.join(missing)} (found {header})"))
        return
    repeated = sorted(h for h, c in Counter(header).items() if c > 1)
    if repeated:
        problems.append(Problem(str(path), 1, f"header: repeated column(s) {repeated} (found {header})"))
        return
    answer_cols = [a for a in task.answer_fields if a in header]
    answer_names = "/".join(answer_cols or task.answer_fields)
    answers_reported = False
    if collector.labelled and not answer_cols:
        problems.append(Problem(str(path), 1, f"header: none of the answer columns {task.answer_fields} "
                                              f"(found {header}); the rows are read as labelled"))
        answers_reported = True
    prev = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            problems.append(Problem(str(path), prev + 1, f"malformed csv ({e})"))
            return
        line, prev = prev + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # a blank line, or one of empty cells only
        if len(row) != len(header):
            problems.append(Problem(str(path), line, f"expected {len(header)} comma-separated cells (as the header "
                                                     f"has), found {len(row)}"))
            continue
        rec = dict(zip(header, row))
        yield _Raw(path, line, f"{path}:{line}", rec, (task.id_field, rec[task.id_field]),
                   [(q, rec[q]) for q in question_cols],
                   None if answers_reported else [(a, rec[a]) for a in answer_cols], answer_names,
                   (task.context_field, rec[task.context_field]) if task.context_field in header else None,
                   (task.group_field, rec[task.group_field]) if task.group_field in header else None)


def _jsonl_items(path: Path, text: str, task: TaskSpec, collector: _Collector) -> Iterator[_Raw]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            collector.problems.append(Problem(str(path), n, f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(rec, dict):
            collector.problems.append(Problem(str(path), n, f"expected a JSON object, got {_kind(rec)}"))
            continue
        yield _Raw(path, n, f"{path}:{n}", rec, (task.id_field, _lookup(rec, task.id_field)),
                   [(q, _lookup(rec, q)) for q in task.question_fields],
                   [(a, _lookup(rec, a)) for a in task.answer_fields], "/".join(task.answer_fields),
                   (task.context_field, _lookup(rec, task.context_field)) if task.context_field else None,
                   (task.group_field, _lookup(rec, task.group_field)) if task.group_field else None)


def _squad_items(path: Path, text: str, task: TaskSpec, collector: _Collector) -> Iterator[_Raw]:
    def bad(message: str) -> None:
        collector.problems.append(Problem(str(path), 0, message))

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        collector.problems.append(Problem(str(path), e.lineno, f"malformed JSON ({e.msg} at line {e.lineno} "
                                                               f"column {e.colno})"))
        return
    articles = doc.get("data", _MISSING) if isinstance(doc, dict) else _MISSING
    if not isinstance(articles, list):
        bad("data: expected a list of articles (SQuAD: {\"data\": [{\"title\", \"paragraphs\": [...]}]}), got "
            + ("nothing" if articles is _MISSING else _kind(articles)))
        return
    for i, article in enumerate(articles):
        at = f"data[{i}]"
        if not isinstance(article, dict):
            bad(f"{at}: expected an object, got {_kind(article)}")
            continue
        title = article.get("title")
        if title is not None and not isinstance(title, str):
            bad(f"{at}.title: expected a string, got {_kind(title)}")
            title = None
        paragraphs = article.get("paragraphs", _MISSING)
        if not isinstance(paragraphs, list):
            bad(f"{at}.paragraphs: expected a list, got {'nothing' if paragraphs is _MISSING else _kind(paragraphs)}")
            continue
        for j, paragraph in enumerate(paragraphs):
            pat = f"{at}.paragraphs[{j}]"
            if not isinstance(paragraph, dict):
                bad(f"{pat}: expected an object, got {_kind(paragraph)}")
                continue
            context = paragraph.get("context", _MISSING)
            if not isinstance(context, str):
                got = "nothing" if context is _MISSING else _kind(context)
                bad(f"{pat}.context: missing or not a string (got {got})")
                context = None
            qas = paragraph.get("qas", _MISSING)
            if not isinstance(qas, list):
                bad(f"{pat}.qas: expected a list, got {'nothing' if qas is _MISSING else _kind(qas)}")
                continue
            for k, qa in enumerate(qas):
                qat = f"{pat}.qas[{k}]"
                if not isinstance(qa, dict):
                    bad(f"{qat}: expected an object, got {_kind(qa)}")
                    continue
                rec = {"title": title, "context": context, **qa}
                yield _Raw(path, 0, f"{path}:0 {qat}", rec, (f"{qat}.id", qa.get("id", _MISSING)),
                           [(f"{qat}.question", qa.get("question", _MISSING))],
                           [(f"{qat}.answers", qa.get("answers", _MISSING))], f"{qat}.answers",
                           (f"{pat}.context", context), (f"{at}.title", title))


_READERS = {"csv": _csv_items, "jsonl": _jsonl_items, "squad": _squad_items}


def read_qa_rows(paths: str | Path | Sequence[str | Path], task: TaskSpec, *, labelled: bool | None = None) -> QARows:
    """Read and validate question-answering items from one or more files of `task`'s format.

    labelled: True requires at least one non-empty reference answer on every row, False ignores
    answers (test files), None takes answers when the first row has them and then requires them
    on every row. Raises `DataError` listing every bad row.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    everywhere = ", ".join(map(str, paths))
    if not task.generates or task.format not in _READERS:
        raise DataError([Problem(everywhere, 0, f"task {task.name}: a {task.kind} task in format {task.format!r} is "
                                                f"not read here; question answering reads kind 'generate' in "
                                                f"{', '.join(GENERATE_FORMATS)} "
                                                f"(classification: nikl_ray.data.read_rows)")])
    problems: list[Problem] = []
    collector = _Collector(task, labelled, problems)
    for path in paths:
        if not path.exists():
            problems.append(Problem(str(path), 0, "file not found"))
            continue
        text = _read_text(path, problems)
        if text is None:
            continue
        for raw in _READERS[task.format](path, text, task, collector):
            collector.add(raw)
    if not problems and not collector.ids:
        problems.append(Problem(everywhere, 0, "no rows"))
    if problems:
        raise DataError(problems)
    c = collector
    return QARows(task, paths, c.ids, c.questions, c.contexts, c.answers if c.labelled else None, c.groups, c.records)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _checked_vectors(rows: QARows, vectors: Any) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(rows) or vectors.shape[1] < 1:
        raise ValueError(f"vectors have shape {vectors.shape}, expected ({len(rows)}, d) with d ≥ 1")
    if not np.isfinite(vectors).all():
        row = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise ValueError(f"vectors: row {row} (id {rows.ids[row]!r}) is not finite")
    return vectors


def _fmt(v: float) -> str:
    return f"{float(v):.9g}"  # float32's round-trip precision


def write_answers(rows: QARows, answers: Sequence[str], path: str | Path, *, vectors: np.ndarray | None = None) -> Path:
    """Write one answer per row: a csv `id,answer` for csv tasks, JSON Lines `{"id", "answer"}`
    otherwise. Same ids, same order; atomic. With `vectors` ((n, d)), each row also carries its
    answer's embedding in the same file (csv: `vec_0 … vec_{d-1}` columns after `answer`; JSON
    Lines: a `vector` list); the competition's vectors-only file is `write_vectors`'s."""
    answers = list(answers)
    if len(answers) != len(rows):
        raise ValueError(f"{len(answers)} answers for {len(rows)} rows")
    for i, a in enumerate(answers):
        if not isinstance(a, str):
            raise ValueError(f"answers[{i}] (id {rows.ids[i]!r}) is a {_kind(a)}, not a string")
    vecs = None if vectors is None else _checked_vectors(rows, vectors)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        if rows.task.format == "csv":
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["id", "answer"] + ([f"vec_{j}" for j in range(vecs.shape[1])] if vecs is not None else []))
            for i, (rid, a) in enumerate(zip(rows.ids, answers)):
                writer.writerow([rid, a] + ([_fmt(v) for v in vecs[i]] if vecs is not None else []))
        else:
            for i, (rid, a) in enumerate(zip(rows.ids, answers)):
                out: dict[str, Any] = {"id": rid, "answer": a}
                if vecs is not None:
                    out["vector"] = [float(_fmt(v)) for v in vecs[i]]
                f.write(json.dumps(out, ensure_ascii=False) + "\n")
    return path


def write_vectors(rows: QARows, vectors: np.ndarray, path: str | Path) -> Path:
    """Write each row's answer embedding as the Hansol competition's submission has it: a csv
    `id,vec_0,…,vec_{d-1}`. Same ids, same order; atomic."""
    vecs = _checked_vectors(rows, vectors)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id"] + [f"vec_{j}" for j in range(vecs.shape[1])])
        for rid, vec in zip(rows.ids, vecs):
            writer.writerow([rid] + [_fmt(v) for v in vec])
    return path
