"""Task specs: what the rows look like and what is predicted.

A task names its labels, whether several may hold at once, and which fields hold the id, the
text, an optional target span and the labels. Three formats cover the work we know of:

- `nikl`: the NIKL 2023 emotion-analysis JSON Lines format (`input.form`, `input.target`,
  `output` as an object of "True"/"False" strings).
- `tsv`: NSMC-style `id<TAB>document<TAB>label` with a header line, one label a row
  (the label is an index into `labels`, or a label name).
- `jsonl`: any JSON Lines file; the fields are named in the spec. Labels are a list of names
  (multi-label) or one name (single-label).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NIKL_EMOTIONS = ["joy", "anticipation", "trust", "surprise", "disgust", "fear", "anger", "sadness"]


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Task name, used in results paths and reports.")
    format: Literal["nikl", "tsv", "jsonl"] = Field(description="Row format of the data files.")
    labels: list[str] = Field(min_length=2, description="Label names, in output order.")
    multi_label: bool = Field(description="Several labels may hold for one row (sigmoid/BCE) "
                                          "or exactly one does (softmax/cross-entropy).")
    id_field: str = Field("id", description="Field (or tsv column) holding the row id.")
    text_field: str = Field("text", description="Field holding the text (tsv: column name).")
    target_field: str | None = Field(None, description="Field holding an optional target span "
                                                       "object {form, begin, end}; None if the task has none.")
    label_field: str = Field("labels", description="Field (or tsv column) holding the labels.")

    @property
    def suffix(self) -> str:
        """The file suffix of rows in this task's format (submissions, selections)."""
        return ".txt" if self.format == "tsv" else ".jsonl"

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
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
                             "(or give a mapping with format/labels/multi_label/fields)") from None
    return TaskSpec(**task)
