"""Two finished runs as one review analyser: a keyword run picks a review's keywords, a sentiment run
gives each its sentiment.

    chain = Chain.load("results/review-keywords", "results/review-sentiment")
    chain.answer(["배송이 정말 빨라요 근데 가격이 너무 비싸요"])
    # [{"keywords": [{"keyword": "배송", "probability": 0.97, "sentiment": "positive", …}, …], …}]
    nikl-ray serve --chain results/review-keywords results/review-sentiment --local

The keyword run is a multi-label classify run over whole reviews (its labels are the keywords); the
sentiment run a single-label classify run whose rows are (review, keyword) pairs: its task has a
target field, and each predicted keyword is its target, located in the review where the review
contains it (data.first_span, as its training rows were read) and encoded as its backbones were
trained (their `target_encoding`). Either run may be answered by its distilled student.
"""

from __future__ import annotations

import time

from nikl_ray.predictor import Predictor


class ChainError(ValueError):
    """Two runs that do not compose (a keyword run that is not multi-label, a sentiment run without targets)."""


class Chain:
    def __init__(self, keywords: Predictor, sentiment: Predictor):
        kw, st = keywords.task, sentiment.task
        if kw.generates or not kw.multi_label:
            raise ChainError(f"{keywords.layout.root}: the keyword run must classify with several labels at once "
                             f"(task {kw.name} is {'a generate task' if kw.generates else 'single-label'})")
        if st.generates or st.multi_label or st.target_field is None:
            raise ChainError(f"{sentiment.layout.root}: the sentiment run must be single-label with a target field "
                             f"holding the keyword (task {st.name} is not)")
        self.keywords, self.sentiment = keywords, sentiment

    @classmethod
    def load(cls, keyword_results, sentiment_results, *, student: bool | str | None = None) -> "Chain":
        """The chain of two finished runs' results folders (`student`: both answered by their students)."""
        return cls(Predictor.load(keyword_results, student=student), Predictor.load(sentiment_results, student=student))

    def describe(self) -> dict:
        """What each run is: what /health says."""
        return {role: {"results": str(p.layout.root), "task": p.task.name, "labels": p.task.labels,
                       "candidate": p.candidate, "rule": p.rule, "student": getattr(p, "form", None)}
                for role, p in (("keywords", self.keywords), ("sentiment", self.sentiment))}

    def warm_up(self) -> float:
        """Both runs' warm-ups and one chained answer with highlights (every path a request takes)."""
        t0 = time.time()
        self.keywords.warm_up()
        self.sentiment.warm_up()
        self.answer(["warm up"], explain=True)
        return time.time() - t0

    def answer(self, texts: list[str], *, explain: bool | list[bool] = False) -> list[dict]:
        """Per review: each predicted keyword (in the keyword run's label order) with its probability,
        its sentiment and the sentiment's probabilities; with `explain` (one flag, or one per review)
        the words behind each keyword and each sentiment."""
        from nikl_ray.explain import explain as highlights

        flags = explain if isinstance(explain, list) else [explain] * len(texts)
        found = self.keywords.predict(self.keywords.rows_of(texts))
        pairs = [(i, k) for i in range(len(texts)) for k in self.keywords.chosen(found, i)]
        rows = self.sentiment.rows_of([texts[i] for i, _ in pairs], [k for _, k in pairs], in_text=False)
        feeling = self.sentiment.predict(rows) if pairs else None
        out = [{"keywords": [], "keyword_candidate": found.candidate, "sentiment_candidate": self.sentiment.candidate}
               for _ in texts]
        labels = self.keywords.task.labels
        for j, (i, keyword) in enumerate(pairs):
            out[i]["keywords"].append({
                "keyword": keyword, "probability": float(found.probs[i, labels.index(keyword)]),
                "sentiment": (self.sentiment.chosen(feeling, j) or [None])[0],
                "sentiment_probabilities": dict(zip(self.sentiment.task.labels, map(float, feeling.probs[j])))})
        for i, text in enumerate(texts):
            if flags[i]:
                out[i]["explanation"] = {
                    "keywords": highlights(self.keywords, text).to_dict(),
                    "sentiment": {k["keyword"]: highlights(self.sentiment, text, k["keyword"], in_text=False).to_dict()
                                  for k in out[i]["keywords"]}}
        return out
