"""Two finished runs served as one review analyser (nikl_ray/chain.py): the demo's keyword run
(multi-label) and its sentiment run of (review, keyword) pairs, each trained once through the real
pipeline from its example YAML, composed in Python and on real Ray Serve over HTTP."""

import json
import statistics
import time
import urllib.request

import pytest

from nikl_ray.demo_reviews import reviews

pytestmark = pytest.mark.slow
EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "nikl_ray" / "examples"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """(keyword results, sentiment results): both example runs, 2 folds each."""
    from nikl_ray import open_run, pipeline

    root = tmp_path_factory.mktemp("reviews")
    return tuple(pipeline(open_run(EXAMPLES / f"review_{name}.yaml", root / name))["results"]
                 for name in ("keywords", "sentiment"))


def test_the_chain_answers_each_keyword_with_its_sentiment(runs):
    """Its keywords are the keyword run's answer, each keyword's sentiment the sentiment run's answer for
    the (review, keyword) pair; on reviews neither run trained on it finds the keywords and their
    sentiments (the demo's phrases are easy: TF-IDF alone reads them)."""
    from nikl_ray.chain import Chain, ChainError
    from nikl_ray.predictor import Predictor

    chain = Chain.load(*runs)
    keywords, sentiment = Predictor.load(runs[0]), Predictor.load(runs[1])
    fresh = reviews(60, seed=1)
    texts = [r["text"] for r in fresh]
    answers = chain.answer(texts)
    found, right, said = 0, 0, 0
    for text, review, answer in zip(texts, fresh, answers):
        expected = keywords.answer(keywords.rows_of([text]))[0]["labels"]
        assert [k["keyword"] for k in answer["keywords"]] == expected
        for k in answer["keywords"]:
            direct = sentiment.answer(sentiment.rows_of([text], [k["keyword"]], in_text=False))[0]
            assert [k["sentiment"]] == direct["labels"] and k["sentiment_probabilities"] == direct["probabilities"]
            if k["keyword"] in review["aspects"]:
                found += 1
                right += k["sentiment"] == review["aspects"][k["keyword"]]
        said += len(review["aspects"])
    assert found / said >= 0.8 and right / found >= 0.7, (found, right, said)
    with pytest.raises(ChainError, match="keyword run must classify with several labels"):
        Chain.load(runs[1], runs[0])


def _post(url, body):
    from test_use import _post as post

    return post(url, body)


def test_the_served_chain_answers_rejects_bad_requests_and_keeps_serving(runs):
    """Over HTTP: what Chain.answer gives (highlights on request); 4xx with the reason for bad bodies,
    and answers after them; the first request costs at most 3× the median of the ten after it."""
    from ray import serve

    from conftest import free_port
    from nikl_ray.chain import Chain
    from nikl_ray.serve import deploy

    url = deploy(port=free_port(), chain=runs)
    text = "배송이 정말 빨라요 근데 가격이 너무 비싸요"

    def seconds(body) -> float:
        t0 = time.perf_counter()
        status, _ = _post(f"{url}/predict", body)
        assert status == 200
        return time.perf_counter() - t0

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=30) as answer:
            health = json.loads(answer.read())
        first = seconds({"text": "처음 보내는 리뷰예요 디자인이 예뻐요"})
        after = [seconds({"text": f"그 다음 리뷰 {i} 사이즈가 딱 맞아요"}) for i in range(10)]
        status, served = _post(f"{url}/predict", {"text": text, "explain": True})
        status_list, listed = _post(f"{url}/predict", [{"text": text}, {"text": "품질이 별로예요"}])
        bad = [_post(f"{url}/predict", body) for body in ({"text": "  "}, {"text": "가" * 3000}, {"text": 5}, [], {})]
        status_after, _ = _post(f"{url}/predict", {"text": text})
    finally:
        serve.shutdown()
    assert health["ready"] and health["keywords"]["task"] == "review-keywords" and health["sentiment"]["task"] == "review-sentiment"
    assert first <= 3 * statistics.median(after), (first, after)
    expected = Chain.load(*runs).answer([text, "품질이 별로예요"], explain=[True, False])
    assert status == 200 and [k["keyword"] for k in served["keywords"]] == [k["keyword"] for k in expected[0]["keywords"]]
    assert [k["sentiment"] for k in served["keywords"]] == [k["sentiment"] for k in expected[0]["keywords"]]
    assert set(served["explanation"]["sentiment"]) == {k["keyword"] for k in served["keywords"]}
    assert status_list == 200 and [[k["keyword"] for k in a["keywords"]] for a in listed] == [
        [k["keyword"] for k in a["keywords"]] for a in expected]
    assert [code for code, _ in bad] == [400, 413, 422, 400, 422]
    assert "text is empty" in bad[0][1]["detail"] and "at most 2000" in bad[1][1]["detail"]
    assert status_after == 200
