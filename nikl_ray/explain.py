"""Why a finished run gave its labels: the words whose removal lowers each label's probability most.

Each whitespace word (the unit the review teams highlighted) is removed in turn — deletion, since
the members read the text through different tokenizers (and the TF-IDF member has no mask
token) — and the run's probability of each predicted label is read again. All variants of a
sentence go through one batched call, answered as the sentence is (by every fold model and head,
or, routed, by the sentence's own), so a drop is the word's effect and nothing else. A target
span keeps its words.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nikl_ray.data import TextRows


@dataclass
class Explanation:
    text: str
    target: str | None
    labels: list[str]  # predicted
    probs: dict[str, float]  # every label
    words: list[tuple[int, int]]  # (begin, end) of each word in the text
    drops: dict[str, list[float]]  # predicted label → per word, probability lost without it (nan: kept)

    def top(self, label: str, n: int = 3) -> list[str]:
        order = np.argsort([-(d if d == d else -np.inf) for d in self.drops[label]], kind="stable")
        return [self.text[slice(*self.words[i])] for i in order[:n] if self.drops[label][i] > 0]

    def marked(self, label: str, n: int = 3) -> str:
        """The text with the label's `n` most important words in [brackets]."""
        keep = set(self.top(label, n))
        out, last = [], 0
        for (b, e) in self.words:
            out.append(self.text[last:b])
            word = self.text[b:e]
            out.append(f"[{word}]" if word in keep else word)
            last = e
        return "".join(out) + self.text[last:]

    def to_dict(self) -> dict:
        return {"labels": self.labels, "probabilities": self.probs,
                "words": [self.text[b:e] for b, e in self.words], "drops": self.drops}

    def html(self) -> str:
        """One line per predicted label, each word shaded by how much the label's probability falls without it."""
        rows = []
        for label in self.labels:
            drops = [d if d == d else 0.0 for d in self.drops[label]]
            peak = max([abs(d) for d in drops] + [1e-9])
            spans = []
            for (b, e), d in zip(self.words, drops):
                color = "220,40,40" if d >= 0 else "40,90,220"
                spans.append(f'<span class="word" data-drop="{d:.4f}" style="background: rgba({color},{abs(d) / peak:.2f})" '
                             f'title="{d:+.3f}">{html.escape(self.text[b:e])}</span>')
            rows.append(f'<p class="label" data-label="{html.escape(label)}"><b>{html.escape(label)}</b> '
                        f'({self.probs[label]:.2f}): {" ".join(spans)}</p>')
        body = "\n".join(rows) or "<p>(no label predicted)</p>"
        return (f'<!doctype html><html><head><meta charset="utf-8"><title>nikl-ray explain</title></head><body>'
                f'<p class="text">{html.escape(self.text)}</p>\n{body}\n</body></html>\n')


def explain(predictor, text: str, target: str | None = None, *, in_text: bool = True) -> Explanation:
    """Each word's effect on the labels `predictor` gives `text` (`in_text`: as Predictor.rows_of)."""
    rows = predictor.rows_of([text], [target], in_text=in_text)
    span = rows.spans[0]
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    removable = [i for i, (b, e) in enumerate(words) if not (span and b < span[1] and e > span[0])]
    texts, targets, spans = [text], [rows.targets[0]], [span]
    for i in removable:
        b, e = words[i]
        cut = e - b + (1 if e < len(text) and text[e] == " " else 0)
        texts.append(text[:b] + text[b + cut:])
        shift = (lambda x: x - cut if x >= e else x)  # noqa: E731 - spans after the removed word move left
        spans.append((shift(span[0]), shift(span[1])) if span else None)
        targets.append(rows.targets[0])
    key = rows.keys()[0]
    out = predictor.predict(TextRows(texts, targets, spans), keys=[key] * len(texts))  # one batch, one route
    labels = predictor.chosen(out, 0)
    drops = {}
    for lab in labels:
        j = predictor.task.labels.index(lab)
        per_word = [float("nan")] * len(words)
        for k, i in enumerate(removable, start=1):
            per_word[i] = float(out.probs[0, j] - out.probs[k, j])
        drops[lab] = per_word
    return Explanation(text, target, labels, dict(zip(predictor.task.labels, map(float, out.probs[0]))), words, drops)


def write_html(explanation: Explanation, path: str | Path) -> Path:
    from nikl_ray.artifacts import write_text

    return write_text(path, explanation.html())
