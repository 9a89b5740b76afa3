"""Task specs: what the rows look like and what is predicted.

Two kinds of task. A `classify` task names its labels, whether several may hold at once, and
which fields hold the id, the text, an optional target span and the labels. A `generate` task
(question answering) names the fields of a question's phrasings, an optional context, the
reference answers and an optional group (category), and the metric answers are scored by
(nikl_ray/qa/metrics.py). Classification formats:

- `nikl`: the NIKL 2023 emotion-analysis JSON Lines format (`input.form`, `input.target`,
  `output` as an object of "True"/"False" strings).
- `tsv`: NSMC-style `id<TAB>document<TAB>label` with a header line, one label a row
  (the label is an index into `labels`, or a label name).
- `jsonl`: any JSON Lines file; the fields are named in the spec. Labels are a list of names
  (multi-label) or one name (single-label).

Question-answering formats (nikl_ray/qa/data.py reads them):

- `csv`: a header line and one item a row, e.g. the Hansol Deco QA (`id, 질문_1, 질문_2, category,
  답변_1 … 답변_5`; its test file `id, 질문`): every question column present and non-empty is a phrasing,
  every answer column a reference.
- `jsonl`: `{id, question, context?, answers: [...]}` (a question field may hold a list of phrasings).
- `squad`: SQuAD / KorQuAD JSON (`data → paragraphs → {context, qas → {id, question, answers → text}}`;
  the article title is the group).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NIKL_EMOTIONS = ["joy", "anticipation", "trust", "surprise", "disgust", "fear", "anger", "sadness"]


CLASSIFY_FORMATS = ("nikl", "tsv", "jsonl")
GENERATE_FORMATS = ("csv", "jsonl", "squad")


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Task name, used in results paths and reports.")
    kind: Literal["classify", "generate"] = Field("classify", description="classify: labels per row; generate: an "
                                                                           "answer per question (QA).")
    format: Literal["nikl", "tsv", "jsonl", "csv", "squad"] = Field(description="Row format of the data files.")
    labels: list[str] = Field([], description="classify: label names, in output order (at least two).")
    multi_label: bool = Field(False, description="classify: several labels may hold for one row (sigmoid/BCE) "
                                                 "or exactly one does (softmax/cross-entropy).")
    id_field: str = Field("id", description="Field (or tsv column) holding the row id.")
    text_field: str = Field("text", description="Field holding the text (tsv: column name).")
    target_field: str | None = Field(None, description="Field holding an optional target span "
                                                       "object {form, begin, end} (jsonl: or a plain string, a "
                                                       "keyword the text need not contain); None if the task has none.")
    label_field: str = Field("labels", description="Field (or tsv column) holding the labels.")
    # generate tasks
    question_fields: list[str] = Field(["question"], description="generate: fields (csv columns) holding a question's "
                                                                 "phrasings; each present and non-empty one is a phrasing "
                                                                 "(a jsonl field may hold a list).")
    context_field: str | None = Field(None, description="generate: field holding an optional context passage.")
    answer_fields: list[str] = Field(["answers"], description="generate: fields (csv columns) holding reference answers "
                                                              "(a jsonl field may hold a list).")
    group_field: str | None = Field(None, description="generate: field holding a group/category (folds are stratified by it).")
    metric: Literal["cosine", "char_f1", "exact_match"] = Field(
        "char_f1", description="generate: how an answer is scored against its references: cosine (sentence embeddings, "
                               "max(cos, 0) averaged over references), char_f1 or exact_match (KorQuAD v1, the max over "
                               "references).")
    embedder: str = Field("use", description="generate: sentence embedder for cosine and submission vectors: `use` "
                                             "(multilingual Universal Sentence Encoder v3, offline) or a local "
                                             "sentence-transformers / HF checkpoint directory.")
    submission_vectors: bool = Field(False, description="generate: the submission holds each answer's embedding "
                                                        "(`id, vec_0 … vec_{d-1}`), beside the answers as text.")

    @property
    def generates(self) -> bool:
        return self.kind == "generate"

    @property
    def suffix(self) -> str:
        """The file suffix of rows in this task's format (submissions, selections)."""
        return {"tsv": ".txt", "csv": ".csv"}.get(self.format, ".jsonl")

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        allowed = GENERATE_FORMATS if self.generates else CLASSIFY_FORMATS
        if self.format not in allowed:
            raise ValueError(f"task {self.name}: format {self.format!r} is not a {self.kind} format ({', '.join(allowed)})")
        if self.generates:
            if self.labels:
                raise ValueError(f"task {self.name}: a generate task has no labels")
            return self
        if len(self.labels) < 2:
            raise ValueError(f"task {self.name}: a classify task needs at least two labels")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task {self.name}: duplicate label names in {self.labels}")
        if self.format == "tsv" and self.multi_label:
            raise ValueError(f"task {self.name}: the tsv format holds one label a row; use jsonl for multi-label")
        return self


BUILTIN_TASKS: dict[str, TaskSpec] = {
    "nikl-emotion": TaskSpec(
        name="nikl-emotion", format="nikl", labels=NIKL_EMOTIONS, multi_label=True,
        text_field="form", target_field="target", label_field="output",
    ),
    "sentence-sentiment": TaskSpec(
        name="sentence-sentiment", format="tsv", labels=["negative", "positive"], multi_label=False,
        text_field="document", label_field="label",
    ),
    "hansol-qa": TaskSpec(
        name="hansol-qa", kind="generate", format="csv", question_fields=["질문_1", "질문_2", "질문"],
        answer_fields=[f"답변_{i}" for i in range(1, 6)], group_field="category", metric="cosine", submission_vectors=True,
    ),
    "korquad": TaskSpec(name="korquad", kind="generate", format="squad", context_field="context", group_field="title",
                        metric="char_f1"),
}


def get_task(task: str | dict | TaskSpec) -> TaskSpec:
    """A built-in task by name, or a spec given as a mapping (e.g. from an experiment YAML)."""
    if isinstance(task, TaskSpec):
        return task
    if isinstance(task, str):
        try:
            return BUILTIN_TASKS[task]
        except KeyError:
            raise ValueError(f"unknown task {task!r}; built-in tasks: {sorted(BUILTIN_TASKS)} "
                             "(or give a mapping with kind/format/labels/multi_label/fields)") from None
    return TaskSpec(**task)
