"""QA answer scoring (KorQuAD EM / char F1, embedding cosine) and MBR selection: hand-computed
values, the real multilingual USE model, and a tiny HF checkpoint built here. No Ray."""

import numpy as np
import pytest

from nikl_ray.qa.metrics import (
    Embedder,
    char_f1,
    cosine_scores,
    exact_match,
    get_embedder,
    mbr_choose,
    mbr_pick,
    metric_label,
    normalize_answer,
    score_answers,
    utility_matrix,
)


@pytest.fixture(scope="module")
def use():
    return get_embedder("use")


# ---- KorQuAD v1 -------------------------------------------------------------------------------

def test_normalize_answer_follows_the_official_script():
    # quote/bracket marks become spaces, ASCII punctuation goes, case folds, whitespace collapses
    assert normalize_answer("《인조반정》") == "인조반정"
    assert normalize_answer("'The  (Great)' War!") == "the great war"
    assert normalize_answer("〈A〉, ‘b’ <c>") == "a b c"
    assert normalize_answer("  ") == ""


def test_char_f1_hand_computed():
    # '1624년에' has 6 chars, '1624년' 5, all 5 shared: P=5/6, R=1, F1=10/11
    assert char_f1("1624년에", ["1624년"]) == pytest.approx(10 / 11)
    assert char_f1("1624년", ["1624년"]) == 1.0
    # whitespace is not a character: '세종 대왕' vs '세종대왕' is a full match
    assert char_f1("세종 대왕", ["세종대왕"]) == 1.0
    # 'abc' vs 'abd': 2 shared of 3 each -> 2/3
    assert char_f1("abc", ["abd"]) == pytest.approx(2 / 3)
    # counts are multisets: 'aab' vs 'ab' -> same 2, P=2/3, R=1 -> 0.8
    assert char_f1("aab", ["ab"]) == pytest.approx(0.8)
    assert char_f1("xyz", ["abc"]) == 0.0


def test_max_over_references_and_empty_prediction():
    assert char_f1("1624년에", ["서울", "1624년", "1624"]) == pytest.approx(10 / 11)
    assert exact_match("1624", ["서울", "1624년", "1624"]) == 1.0
    assert exact_match("1624년에", ["1624년"]) == 0.0
    assert char_f1("", ["1624년"]) == 0.0
    assert exact_match("", ["1624년"]) == 0.0
    assert char_f1("《》", ["1624년"]) == 0.0  # normalises to nothing
    with pytest.raises(ValueError):
        char_f1("a", [])


def test_normalisation_makes_exact_match_one():
    assert exact_match("《인조반정》", ["인조반정"]) == 1.0
    assert exact_match('"Seoul."', ["seoul"]) == 1.0
    assert exact_match("(조선)  세종", ["조선 세종"]) == 1.0


def test_score_answers_by_metric():
    preds, refs = ["1624년에", "인조반정", ""], [["1624년"], ["《인조반정》", "x"], ["a"]]
    np.testing.assert_allclose(score_answers("char_f1", preds, refs), [10 / 11, 1.0, 0.0])
    np.testing.assert_allclose(score_answers("exact_match", preds, refs), [0.0, 1.0, 0.0])
    assert [metric_label(m) for m in ("cosine", "char_f1", "exact_match")] == ["cosine", "char F1", "exact match"]
    with pytest.raises(ValueError, match="embedder"):
        score_answers("cosine", preds, refs)
    with pytest.raises(ValueError, match="unknown"):
        score_answers("bleu", preds, refs)
    with pytest.raises(ValueError, match="predictions"):
        score_answers("char_f1", preds, refs[:2])


# ---- cosine -----------------------------------------------------------------------------------

def test_use_embedder_rows_are_unit_and_empty_text_is_fine(use):
    assert get_embedder("use") is use  # cached per process
    v = use.encode(["벽지에 곰팡이가 생겼어요", "", "   "])
    assert v.shape == (3, 512) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert use.encode([]).shape == (0, 512)


def test_cosine_of_an_answer_with_itself_is_one_and_never_negative(use):
    answer = "도배지에 곰팡이가 생기면 환기를 자주 하고 곰팡이 제거제를 사용하세요."
    assert cosine_scores([answer], [[answer]], use)[0] == pytest.approx(1.0, abs=1e-5)
    texts = ["벽지 곰팡이 제거 방법", "The stock market fell sharply today.", "1624년", "", "ㅋㅋㅋ",
             "Photosynthesis converts light into chemical energy.", "바닥재 교체 비용은 얼마인가요?"]
    raw = use.encode(texts) @ use.encode(texts).T
    preds = [a for a in texts for _ in texts]
    refs = [[b] for _ in texts for b in texts]
    scores = cosine_scores(preds, refs, use)
    assert (scores >= 0).all() and (scores <= 1).all()
    np.testing.assert_allclose(scores, np.clip(raw, 0, None).reshape(-1), atol=1e-5)


def test_cosine_is_the_mean_over_references_of_the_clipped_cosine(use):
    preds = ["방수 공사는 전문 업체에 맡기는 것이 좋습니다.", "벽지는 습기에 약합니다."]
    refs = [["방수 공사는 전문가에게 맡기세요.", "누수가 있으면 방수 공사가 필요합니다.", "The weather is nice.",
             "방수층을 새로 시공해야 합니다.", "업체 견적을 비교하세요."],
            ["벽지는 습기에 약해 곰팡이가 생기기 쉽습니다.", "습도를 낮추세요."]]
    got = cosine_scores(preds, refs, use)
    want = []
    for p, rs in zip(preds, refs):
        pv, rv = use.encode([p])[0], use.encode(rs)
        want.append(np.mean(np.maximum(rv @ pv, 0)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(score_answers("cosine", preds, refs, embedder=use), want, atol=1e-5)
    np.testing.assert_allclose(score_answers("cosine", preds, refs, embedder="use"), want, atol=1e-5)


# ---- HF checkpoint embedder -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    import torch
    import transformers

    from nikl_ray.tiny import make_tokenizer

    texts = ["도배지 곰팡이 제거", "바닥재 교체 비용", "방수 공사 업체", "벽지 습기 환기", "hello world"] * 20
    tokenizer = make_tokenizer("bert", texts, 200)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_bert")
    transformers.BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_hf_checkpoint_embedder_mean_pools_to_unit_rows(tiny_bert):
    import torch
    from transformers import AutoModel, AutoTokenizer

    embedder = get_embedder(str(tiny_bert))
    assert isinstance(embedder, Embedder) and embedder.name == str(tiny_bert)
    assert get_embedder(str(tiny_bert)) is embedder
    texts = ["도배지 곰팡이 제거", "방수 공사 업체 바닥재 교체 비용", ""]
    v = embedder.encode(texts)
    assert v.shape == (3, 32) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # the same as pooling each text alone (padding in a batch must not leak in)
    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    with torch.no_grad():
        alone = model(**tok([texts[0]], return_tensors="pt")).last_hidden_state.mean(1)[0].numpy()
    np.testing.assert_allclose(v[0], alone / np.linalg.norm(alone), atol=1e-5)
    assert score_answers("cosine", [texts[0]], [[texts[0]]], embedder=embedder)[0] == pytest.approx(1.0, abs=1e-5)


def test_a_bad_embedder_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match="no_such_model"):
        get_embedder(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        get_embedder(str(tmp_path / "empty"))


# ---- MBR --------------------------------------------------------------------------------------

def test_mbr_pick_rules():
    assert mbr_pick(np.array([[1.0]])) == 0
    assert mbr_pick(np.ones((4, 4))) == 0  # all tied -> lowest index
    u = np.array([[1.0, 0.1, 0.1], [0.1, 1.0, 0.9], [0.1, 0.9, 1.0]])
    assert mbr_pick(u) == 1  # diagonal excluded: candidate 0's self-utility does not count
    # weights are the others' weight as evidence: a heavy candidate 3 that 0 agrees with more than 1 does
    u = np.array([[1.0, 0.7, 0.7, 0.2], [0.7, 1.0, 0.9, 0.1], [0.7, 0.9, 1.0, 0.1], [0.2, 0.1, 0.1, 1.0]])
    assert mbr_pick(u) == 1  # 1 and 2 tie on 1.7/3 > 1.6/3: the lower index
    w = np.array([1.0, 1.0, 1.0, 5.0])
    # 0: (.7 + .7 + 5*.2)/7 = .343 beats 1: (.7 + .9 + 5*.1)/7 = .300
    assert mbr_pick(u, w) == 0
    # a zero-weight candidate is no evidence but still a hypothesis: with 2 and 3 zeroed, 0 and 1 score
    # 0.7 each (on each other) and 2 scores (.7 + .9)/2 = .8 on them
    assert mbr_pick(u, np.array([1.0, 1.0, 0.0, 0.0])) == 2
    assert mbr_pick(np.ones((2, 2)), np.zeros(2)) == 0  # no evidence at all: every score 0, a tie
    with pytest.raises(ValueError):
        mbr_pick(np.zeros((0, 0)))


CONSENSUS_KO = ["인조반정은 1623년에 일어났다", "인조반정은 1623년에 일어났다.", "인조반정은 1623년 일어났다"]
OUTLIERS_KO = ["세종대왕", "The stock market fell sharply today."]


def test_mbr_picks_a_consensus_answer_under_char_f1():
    candidates = [OUTLIERS_KO[0], CONSENSUS_KO[0], OUTLIERS_KO[1], CONSENSUS_KO[1], CONSENSUS_KO[2]]
    u = utility_matrix("char_f1", candidates)
    assert u.shape == (5, 5) and np.allclose(u, u.T)
    assert u[1, 3] == 1.0  # the final '.' is normalised away
    assert candidates[mbr_pick(u)] in CONSENSUS_KO
    assert mbr_pick(u) == 1  # 1 and 3 tie exactly: the lowest index
    em = utility_matrix("exact_match", candidates)
    assert mbr_pick(em) == 1
    picks = mbr_choose("char_f1", [candidates, ["a"], ["b", "abc", "abd"]])
    assert picks == [1, 0, 1]


def test_mbr_picks_a_consensus_answer_under_cosine(use):
    consensus = ["벽지에 곰팡이가 생기면 환기를 자주 하세요.", "곰팡이가 핀 벽지는 환기를 자주 해 주세요.",
                 "벽지 곰팡이에는 자주 환기하는 것이 좋습니다."]
    outliers = ["The stock market fell sharply today.", "1624년"]
    candidates = [outliers[0], consensus[0], outliers[1], consensus[1], consensus[2]]
    vectors = use.encode(candidates)
    u = utility_matrix("cosine", candidates, vectors=vectors)
    np.testing.assert_allclose(u, utility_matrix("cosine", candidates, embedder=use), atol=1e-6)
    assert (u >= 0).all()
    assert candidates[mbr_pick(u)] in consensus
    picks = mbr_choose("cosine", [candidates, candidates[::-1], ["하나뿐인 답"]], embedder=use)
    assert candidates[picks[0]] in consensus and candidates[::-1][picks[1]] in consensus and picks[2] == 0
