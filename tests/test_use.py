"""Using a finished run: served on Ray Serve over real HTTP, explained word by word, and asked what to
label next (the trained fixture's run)."""

import contextlib
import json
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

import numpy as np
import pytest

from nikl_ray.data import read_rows

pytestmark = pytest.mark.slow


def _post(url, body, timeout=60):
    data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def served(stacked, tmp_path_factory):
    """The finished run copied to a folder of its own and served from there: (stacked, url, the copy)."""
    import shutil

    from ray import serve

    from conftest import free_port
    from nikl_ray.serve import deploy

    copy = tmp_path_factory.mktemp("copied") / "run"
    shutil.copytree(stacked[0].results, copy)
    url = deploy(copy, port=free_port())
    yield stacked, url, copy
    serve.shutdown()


def test_the_first_request_after_start_costs_what_the_next_ones_do(stacked, tmp_path):
    """A replica loads and runs every model it serves before it says it is ready. Served here: a copy
    of the run that submits its stack, which reads every active member's fold models and the heads
    (the fixture's run submits TF-IDF, which loads in no time; unwarmed, this one's first request took
    4.2 s against 0.03 s for the next). Its own Serve instance, shut down before `served` starts one."""
    import shutil

    from ray import serve

    from conftest import free_port
    from nikl_ray.serve import deploy

    copy = tmp_path / "run"
    shutil.copytree(stacked[0].results, copy)
    record_path = copy / "ensemble" / "run.json"
    record = json.loads(record_path.read_text())
    record["decision"].update(candidate="stack", **record["rules"]["stack"])
    record_path.write_text(json.dumps(record))
    url = deploy(copy, port=free_port())

    def seconds(text: str) -> float:
        t0 = time.perf_counter()
        status, answer = _post(f"{url}/predict", {"text": text})
        assert status == 200 and answer["candidate"] == "stack", answer
        return time.perf_counter() - t0

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=30) as answer:
            health = json.loads(answer.read())
        first = seconds("처음 보내는 문장이다")
        after = [seconds(f"그 다음에 보내는 문장 {i}") for i in range(10)]
    finally:
        serve.shutdown()
    assert health["ready"] and health["warm_up_seconds"] > 0 and health["candidate"] == "stack"
    assert first <= 3 * statistics.median(after), (first, after)


@contextlib.contextmanager
def hidden(*folders):
    """The folders renamed away for the block: whatever reads them fails."""
    moved = [f.rename(f.with_name(f.name + ".hidden")) for f in folders]
    try:
        yield
    finally:
        for before, after in zip(folders, moved):
            after.rename(before)


def test_a_copied_run_answers_alone_the_same_in_python_on_the_command_line_and_served(served, cli):
    """With the experiment's data and its original results folder out of reach, the copy answers
    byte for byte alike through Predictor.load, `nikl-ray predict --results` and a served request,
    with any candidate; its leaderboard is the report's table."""
    from nikl_ray.predictor import Predictor
    from nikl_ray.tables import markdown

    (exp, data, _), url, copy = served
    texts = ["오늘 경기 보고 진짜 너무 무서워", "새 앨범 빨리 듣고 싶다", data.test.texts[0]]
    with hidden(exp.results, exp.train[0].parent):
        predictor = Predictor.load(copy)
        for text in texts:
            expected = json.dumps(predictor.answer(predictor.rows_of([text]))[0], ensure_ascii=False)
            code, out, err = cli("predict", "--results", copy, "--text", text, "--json")
            assert code == 0, err
            assert out.strip() == expected
            status, answer = _post(f"{url}/predict", {"text": text})
            assert status == 200 and json.dumps(answer, ensure_ascii=False) == expected
        board = predictor.leaderboard()
        assert markdown(board) in (copy / "ensemble" / "report.md").read_text(encoding="utf-8")
        assert {row["ensemble"] for row in board} == set(predictor.candidates)
        other = next(row["ensemble"] for row in board if row["role"] == "candidate")
        answer = predictor.answer(predictor.rows_of(texts[:1]), candidate=other)[0]
        assert answer["candidate"] == other
        code, out, _ = cli("predict", "--results", copy, "--text", texts[0], "--json", "--candidate", other)
        assert json.loads(out) == answer


def test_served_answers_equal_the_submission_and_health_says_what_is_served(served):
    (exp, data, _), url, _ = served
    with urllib.request.urlopen(f"{url}/health", timeout=30) as answer:
        health = json.loads(answer.read())
    decision = json.loads(exp.layout.decision.read_text())
    assert health["status"] == "ok" and health["candidate"] == decision["candidate"] and health["rule"] == decision["rule"]
    test = data.test
    rows = [{"text": t, "target": g} for t, g, s in zip(test.texts, test.targets, test.spans)
            if g is None or t.find(g) == s[0]]  # a served target is its first occurrence
    keep = [i for i, (t, g, s) in enumerate(zip(test.texts, test.targets, test.spans)) if g is None or t.find(g) == s[0]]
    status, answers = _post(f"{url}/predict", rows)
    assert status == 200 and len(answers) == len(rows), answers
    sub = read_rows(exp.layout.submission(".jsonl"), exp.task, labelled=True)
    for i, answer in zip(keep, answers):
        assert answer["labels"] == [lab for lab, d in zip(exp.task.labels, sub.labels[i]) if d], (i, answer)
        assert answer["rule"] == decision["rule"] and set(answer["probabilities"]) == set(exp.task.labels)


@pytest.mark.parametrize("body, code", [
    ({"text": ""}, 400), ({"text": "   "}, 400), ({"text": 5}, 422), ({}, 422), ({"txt": "영화"}, 422),
    ({"text": "오늘 영화 좋다", "target": "공연"}, 400), ({"text": "좋다" * 1500}, 413), ([], 400),
    (b"not json", 422),
])
def test_a_malformed_request_gets_a_4xx_and_the_replica_keeps_serving(served, body, code):
    _, url, _ = served
    status, answer = _post(f"{url}/predict", body)
    assert status == code, answer
    assert _post(f"{url}/predict", {"text": "오늘 영화 너무 좋다"})[0] == 200


def test_a_burst_of_concurrent_requests_is_answered_in_full(served):
    (_, data, _), url, _ = served
    texts = data.test.texts * 2

    def one(text):
        t0 = time.time()
        status, answer = _post(f"{url}/predict", {"text": text})
        return status, time.time() - t0

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, texts))
    wall = time.time() - t0
    latencies = sorted(t for _, t in results)
    assert [s for s, _ in results] == [200] * len(texts)  # nothing dropped
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
    print(f"\n{len(texts)} requests, 8 at a time: {len(texts) / wall:.1f} requests/s, p50 {p50 * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms")


def test_explain_ranks_the_planted_phrase_first_and_writes_shaded_html(stacked, tmp_path):
    """The demo rows are built from planted phrases (`너무 무서워` → fear): without `무서워` the run's
    fear probability falls more than without any other word."""
    from nikl_ray.explain import explain, write_html
    from nikl_ray.predictor import Predictor

    exp = stacked[0]
    e = explain(Predictor.load(exp.results), "오늘 경기 보고 진짜 너무 무서워", None)
    assert "fear" in e.labels, e.probs
    assert e.top("fear", 1) == ["무서워"], e.drops["fear"]
    assert "[무서워]" in e.marked("fear")
    path = write_html(e, tmp_path / "explain.html")

    class Spans(HTMLParser):
        def __init__(self):
            super().__init__()
            self.label, self.words = None, {}

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "p" and attrs.get("class") == "label":
                self.label = attrs["data-label"]
            if tag == "span" and attrs.get("class") == "word":
                self.pending = float(attrs["data-drop"])

        def handle_data(self, text):
            if getattr(self, "pending", None) is not None:
                self.words.setdefault(self.label, []).append((text, self.pending))
                self.pending = None

    parser = Spans()
    parser.feed(path.read_text(encoding="utf-8"))
    assert set(parser.words) == set(e.labels)
    assert max(parser.words["fear"], key=lambda w: w[1])[0] == "무서워"


def test_rows_near_the_decision_boundary_are_picked_before_confident_ones(stacked, tmp_path):
    from nikl_ray.predictor import Predictor
    from nikl_ray.select import rank, write_selection

    exp, data, _ = stacked
    pool = data.test
    ranked = rank(Predictor.load(exp.results), pool, rarity_weight=0.0)
    u = [r["uncertainty"] for r in ranked]
    assert u == sorted(u, reverse=True) and u[0] > u[-1]  # the most uncertain first
    n = 10
    confident = min(ranked, key=lambda r: r["uncertainty"])["id"]
    path = write_selection(pool, ranked, n, tmp_path / "next.jsonl")
    chosen = read_rows(path, exp.task, labelled=False)
    assert len(chosen) == n and confident not in chosen.ids
    assert np.mean(u[:n]) > np.mean(u[n:])
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert set(first["selection"]) == {"score", "uncertainty", "rarity", "probabilities"} and "output" not in first
