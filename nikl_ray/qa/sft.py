"""Supervised fine-tuning of a causal LM on question → answer, and answering with it.

Prompts. The tokenizer's chat template when it has one (the question, with any context and
retrieved items before it, as one user turn; the answer is the assistant's turn), else one
plain template:

    [문맥: {context}\n]
    [참고 질문: {retrieved question}\n참고 답변: {its first reference}\n\n]…
    질문: {question}\n답변: {answer}<eos>

Training pairs. An item with P phrasings and R references gives P × R pairs, each phrasing with
each reference: every reference is a right answer, and training on all of them teaches the
spread of right answers instead of one arbitrary pick (the ensemble's minimum-Bayes-risk
selection then favours what the references share). The loss is on the answer tokens only
(prompt positions get label -100); the answer is cut at `max_new_tokens` (what generation can
produce), the prompt from the left (the question, last, is kept).

Retrieval (`retrieve: {k}`): the k training items nearest a question by TF-IDF (characters 1–3)
over their questions. A training pair never retrieves its own item; a held-out, selection or
test question retrieves only from the items its fold model trains on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from nikl_ray.qa.data import Query, queries

log = logging.getLogger(__name__)
IGNORE = -100  # the label of a position the loss skips


@dataclass(frozen=True)
class QAPayload:
    """What workers need of a generate task's rows (put into Ray's object store once per stage)."""

    ids: list[str]
    questions: list[list[str]]
    contexts: list[str | None]
    answers: list[list[str]]
    test_ids: list[str]
    test_questions: list[list[str]]
    test_contexts: list[str | None]

    @classmethod
    def of(cls, rows, test=None) -> "QAPayload":
        return cls(rows.ids, rows.questions, rows.contexts, rows.answers, test.ids if test is not None else [],
                   test.questions if test is not None else [], test.contexts if test is not None else [])


class Retriever:
    """TF-IDF (character 1–3-grams) over the questions of some items: an item's score is its best phrasing's."""

    def __init__(self, questions: list[list[str]], items: np.ndarray):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.items = np.asarray(items, dtype=int)
        self._owner = np.array([i for i in self.items for _ in questions[i]], dtype=int)
        texts = [q for i in self.items for q in questions[i]]
        self._vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)
        self._x = self._vec.fit_transform(texts)

    def nearest(self, texts: list[str], k: int, exclude: list[int | None] | None = None) -> list[list[int]]:
        """Per text, the positions of its k nearest items (best first), never its `exclude` item."""
        if not texts:
            return []
        sims = (self._vec.transform(texts) @ self._x.T).toarray()
        out = []
        for row, sim in enumerate(sims):
            best: dict[int, float] = {}
            for owner, s in zip(self._owner, sim):
                if s > best.get(owner, -1.0):
                    best[owner] = s
            if exclude is not None and exclude[row] is not None:
                best.pop(exclude[row], None)
            out.append(sorted(best, key=lambda i: (-best[i], i))[:k])
        return out


class Prompter:
    """Prompts of one fold model: its template, and retrieval from the items it trains on."""

    def __init__(self, tokenizer, questions: list[list[str]], answers: list[list[str]], train_items: np.ndarray,
                 k: int = 0):
        self.tokenizer, self.questions, self.answers, self.k = tokenizer, questions, answers, k
        self.retriever = Retriever(questions, train_items) if k else None

    def prompts(self, qs: list[Query], *, own_item: bool = False) -> list[str]:
        """The prompt of each query; `own_item`: the queries are training items (never retrieved for themselves)."""
        found = (self.retriever.nearest([q.question for q in qs], self.k, [q.item for q in qs] if own_item else None)
                 if self.retriever else [[] for _ in qs])
        return [self.render(q, [(self.questions[i][0], self.answers[i][0]) for i in near]) for q, near in zip(qs, found)]

    def render(self, q: Query, retrieved: list[tuple[str, str]]) -> str:
        before = "".join(f"참고 질문: {rq}\n참고 답변: {ra}\n\n" for rq, ra in retrieved)
        if q.context:
            before = f"문맥: {q.context}\n" + before
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": before + q.question}],
                                                      tokenize=False, add_generation_prompt=True)
        return f"{before}질문: {q.question}\n답변:"


def encode_pair(tokenizer, prompt: str, answer: str, max_length: int, max_new_tokens: int) -> dict:
    """Token ids of prompt + answer + eos, labels only on the answer's tokens (and eos)."""
    answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"][:max_new_tokens - 1]
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    prompt_ids = tokenizer(prompt)["input_ids"]
    prompt_ids = prompt_ids[-max(max_length - len(answer_ids), 1):]  # keep the question (the prompt's end)
    ids = prompt_ids + answer_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * len(prompt_ids) + answer_ids}


def pairs_dataset(tokenizer, prompter: Prompter, data: QAPayload, index: np.ndarray, spec, *, own_item: bool):
    """A `datasets.Dataset` of every (phrasing, reference) pair of the items at `index`."""
    import datasets

    qs = queries(data.ids, data.questions, data.contexts, index)
    prompts = prompter.prompts(qs, own_item=own_item)
    rows = [encode_pair(tokenizer, p, a, spec.max_length, spec.max_new_tokens)
            for q, p in zip(qs, prompts) for a in data.answers[q.item]]
    return datasets.Dataset.from_list(rows)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, *, batch_size: int = 16, samples: int = 0,
             temperature: float = 0.8, seed: int = 0, max_length: int | None = None) -> list[list[tuple[str, float | None]]]:
    """Per prompt, its greedy answer and then `samples` sampled ones, each with its mean token
    log-probability (None for greedy). Greedy answers in batches of similar length, left-padded and
    cut from the left as training prompts are (the question, last, is kept); samples one prompt at a
    time, seeded by the prompt's text, so a question gets the same samples whatever it is batched with."""
    import hashlib

    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    cut, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    out: list = [None] * len(prompts)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, truncation=max_length is not None,
                            max_length=max_length).to(next(model.parameters()).device)
            common = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
            with torch.no_grad():
                greedy = model.generate(**enc, do_sample=False, **common)
                answers = [[(text, None)] for text in _decode(tokenizer, greedy, enc["input_ids"].shape[1])]
                for j, i in enumerate(idx[:len(idx) if samples else 0]):
                    one = tokenizer([prompts[i]], return_tensors="pt", truncation=max_length is not None,
                                    max_length=max_length).to(enc["input_ids"].device)
                    torch.manual_seed(seed + int(hashlib.sha256(prompts[i].encode()).hexdigest()[:8], 16))
                    sampled = model.generate(**one, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                                             num_return_sequences=samples, output_scores=True,
                                             return_dict_in_generate=True, **common)
                    texts = _decode(tokenizer, sampled.sequences, one["input_ids"].shape[1])
                    logp = mean_logprobs(model, sampled, tokenizer.eos_token_id, one["input_ids"].shape[1])
                    answers[j] += list(zip(texts, logp))
            for j, i in enumerate(idx):
                out[i] = answers[j]
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, cut
        model.train(was_training)
    return out


def _decode(tokenizer, sequences, prompt_len: int) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)]


def mean_logprobs(model, generated, eos_id: int, prompt_len: int) -> list[float]:
    """Mean log-probability of each sampled answer's tokens, up to and including its first eos (what
    follows is padding, which may be the eos token itself)."""
    scores = model.compute_transition_scores(generated.sequences, generated.scores, normalize_logits=True)
    ended = (generated.sequences[:, prompt_len:] == eos_id).int()
    real = ((ended.cumsum(1) - ended) == 0).float()  # before the first eos, and the eos
    return ((scores * real).sum(1) / real.sum(1).clamp(min=1)).tolist()
