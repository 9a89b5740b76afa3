import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import DEMO_DIR, NSMC_DIR, nikl_row, write_jsonl
from nikl_ray.data import DataError, read_rows, write_predictions
from nikl_ray.tasks import get_task

NIKL = get_task("nikl-emotion")


def _problems(path, **kw):
    with pytest.raises(DataError) as e:
        read_rows(path, NIKL, **kw)
    return e.value.problems


@pytest.mark.parametrize("bad_line, expected", [
    ('{"id": "x", "input": ', "malformed JSON"),
    ('[1, 2]', "expected a JSON object"),
    (json.dumps({"input": {"form": "a"}}), "id: missing"),
    (json.dumps({"id": "x", "input": {}}), "input.form: missing"),
    (json.dumps(nikl_row(labels=()) | {"output": {"joy": "yes"}}), "unknown label|missing label"),
    (json.dumps(nikl_row() | {"output": {**nikl_row()["output"], "joy": "true"}}), 'expected "True" or "False"'),
    (json.dumps(nikl_row() | {"output": {**nikl_row()["output"], "love": "True"}}), "unknown label"),
    (json.dumps(nikl_row(target=("영화", 0, 2))), "does not match form"),
    (json.dumps(nikl_row(target=("영화", 3, 99))), "does not match form"),
    (json.dumps(nikl_row() | {"input": {"form": "영화", "target": {"form": "영화", "begin": "0", "end": 2}}}), "integers"),
    (json.dumps({k: v for k, v in nikl_row().items() if k != "output"}), "output: missing"),
])
def test_each_kind_of_bad_row_gets_its_own_message_with_file_and_line(tmp_path, bad_line, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [nikl_row("ok1"), bad_line, nikl_row("ok2")])
    problems = _problems(path)
    assert len(problems) == 1
    assert problems[0].line == 2 and problems[0].path == str(path)
    assert __import__("re").search(expected, problems[0].message), problems[0].message
    assert f"{path}:2:" in str(DataError(problems))


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [nikl_row("a"), nikl_row("b"), nikl_row("a")])
    (p,) = _problems(path)
    assert p.line == 3 and "duplicate id 'a'" in p.message and ":1" in p.message


def test_every_bad_line_is_listed_and_the_message_is_capped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{"] * 30)
    with pytest.raises(DataError) as e:
        read_rows(path, NIKL)
    assert len(e.value.problems) == 30
    assert "and 10 more" in str(e.value)


def test_null_and_missing_targets_are_valid(tmp_path):
    row = nikl_row("b", target=None)
    no_target = nikl_row("c")
    del no_target["input"]["target"]
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", [nikl_row("a"), row, no_target]), NIKL)
    assert rows.targets == ["영화", None, None]


def test_unlabelled_test_file_reads_without_labels():
    rows = read_rows(DEMO_DIR / "test.jsonl", NIKL)
    assert rows.labels is None and len(rows) == 100


def test_round_trip_keeps_ids_order_and_labels(tmp_path):
    rows = read_rows(DEMO_DIR / "train.jsonl", NIKL)
    out = write_predictions(rows, rows.labels.astype(bool), tmp_path / "pred.jsonl")
    again = read_rows(out, NIKL)
    assert again.ids == rows.ids
    np.testing.assert_array_equal(again.labels, rows.labels)
    assert [r["input"] for r in again.records] == [r["input"] for r in rows.records]


def test_writing_test_predictions_fills_output_with_true_false_strings(tmp_path):
    test = read_rows(DEMO_DIR / "test.jsonl", NIKL)
    decisions = np.zeros((len(test), 8), dtype=bool)
    decisions[:, 0] = True
    out = write_predictions(test, decisions, tmp_path / "sub.jsonl")
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first["id"] == test.ids[0] and first["output"]["joy"] == "True" and first["output"]["fear"] == "False"


def test_writer_refuses_a_wrong_shape_and_leaves_no_file(tmp_path):
    test = read_rows(DEMO_DIR / "test.jsonl", NIKL)
    with pytest.raises(ValueError):
        write_predictions(test, np.zeros((3, 8)), tmp_path / "sub.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_sentence_sentiment_tsv(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text('id\tdocument\tlabel\n1\t재밌다 "최고"\t1\n2\t지루해\t0\n3\t별로\tx\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_rows(path, get_task("sentence-sentiment"))
    assert e.value.problems[0].line == 4
    path.write_text('id\tdocument\tlabel\n1\t재밌다 "최고"\t1\n2\t지루해\t0\n', encoding="utf-8")
    rows = read_rows(path, get_task("sentence-sentiment"))
    assert rows.texts[0] == '재밌다 "최고"' and rows.labels.tolist() == [[0, 1], [1, 0]]
    out = write_predictions(rows, rows.labels.astype(bool), tmp_path / "out.txt")
    assert out.read_text(encoding="utf-8").splitlines()[1] == '1\t재밌다 "최고"\t1'


@pytest.mark.skipif(not NSMC_DIR.exists(), reason="../shared/data/nsmc_like is absent")
def test_real_nsmc_files_read():
    task = get_task("sentence-sentiment")
    train = read_rows(NSMC_DIR / "ratings_train.txt", task)
    test = read_rows(NSMC_DIR / "ratings_test.txt", task)
    assert len(train) == 150_000 and abs(train.labels[:, 1].mean() - 0.5) < 0.05
    assert len(test) == 50_000 and test.labels is None


def test_generic_jsonl_multi_label_review_keywords(tmp_path):
    task = get_task({"name": "review-keywords", "format": "jsonl", "labels": ["price", "taste", "delivery"],
                     "multi_label": True, "text_field": "review", "label_field": "keywords"})
    path = write_jsonl(tmp_path / "k.jsonl", [{"id": 1, "review": "싸고 맛있어요", "keywords": ["price", "taste"]},
                                             {"id": 2, "review": "배송 느림", "keywords": ["shipping"]}])
    with pytest.raises(DataError, match="unknown label 'shipping'"):
        read_rows(path, task)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_our_validation_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_bytes(data)
    try:
        read_rows(path, NIKL)
    except DataError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(json_values, st.fixed_dictionaries({"id": st.text(max_size=3), "input": json_values,
                                                              "output": json_values})), min_size=1, max_size=5))
def test_arbitrary_json_rows_only_ever_raise_our_validation_error(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    write_jsonl(path, [json.dumps(r) for r in records])
    try:
        rows = read_rows(path, NIKL)
    except DataError:
        return
    assert len(rows) == len(records)
