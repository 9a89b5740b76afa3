"""Question-answering rows: reading (csv, jsonl, squad), validation, folds' strata, submissions."""

import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nikl_ray.data import DataError
from nikl_ray.qa.data import QARows, Query, read_qa_rows, write_answers, write_vectors
from nikl_ray.tasks import TaskSpec, get_task

HERE = Path(__file__).resolve()
DEMO_DIR = HERE.parents[1] / "nikl_ray" / "demo_data"
HANSOL_DIRS = [HERE.parents[1].parent / "shared" / "data" / "hansol_qa", HERE.parents[2] / "shared/data/hansol_qa"]
HANSOL_DIR = next((d for d in HANSOL_DIRS if d.exists()), HANSOL_DIRS[0])

HANSOL = get_task("hansol-qa")
KORQUAD = get_task("korquad")
QA = TaskSpec(name="qa", kind="generate", format="jsonl", context_field="context", group_field="category")
DEMO = TaskSpec(name="qa-demo", kind="generate", format="jsonl", group_field="category")

HANSOL_HEADER = "id,질문_1,질문_2,category,답변_1,답변_2,답변_3,답변_4,답변_5\n"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def item(rid="a", question="도배지 들뜸은 왜 생기나요?", answers=("풀칠이 부족해서 생깁니다.",), **extra):
    row = {"id": rid, "question": question, "answers": list(answers) if isinstance(answers, tuple) else answers}
    return row | extra


def problems_of(path, task=QA, **kw):
    with pytest.raises(DataError) as e:
        read_qa_rows(path, task, **kw)
    return e.value.problems


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def test_jsonl_phrasings_references_contexts_and_groups(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        item("a", ["벽지가 왜 떠요?", " ", "벽지 들뜸 원인은?"], ["습기 때문입니다.", ""], context="벽지 이야기", category="마감"),
        item(7, "곰팡이는?", [{"text": "환기하세요.", "answer_start": 0}, {"text": "습도를 낮추세요."}]),
        item("c", "결로?", "단열을 보강합니다.", category="구조"),
    ])
    rows = read_qa_rows(path, QA)
    assert isinstance(rows, QARows) and len(rows) == 3
    assert rows.ids == ["a", "7", "c"]
    assert rows.questions == [["벽지가 왜 떠요?", "벽지 들뜸 원인은?"], ["곰팡이는?"], ["결로?"]]
    assert rows.answers == [["습기 때문입니다."], ["환기하세요.", "습도를 낮추세요."], ["단열을 보강합니다."]]
    assert rows.contexts == ["벽지 이야기", None, None]
    assert rows.groups == ["마감", None, "구조"]
    assert rows.records[1]["id"] == 7 and rows.paths == [path]
    assert not hasattr(rows, "labels")  # classification code tells the families apart by it


def test_several_question_and_answer_fields_in_order(tmp_path):
    task = TaskSpec(name="t", kind="generate", format="jsonl", question_fields=["q1", "q2"], answer_fields=["a1", "a2"])
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "x", "q2": "둘째", "q1": "첫째", "a2": ["나"], "a1": "가"},
                                             {"id": "y", "q2": "둘째만", "a1": None, "a2": "다"}])
    rows = read_qa_rows(path, task)
    assert rows.questions == [["첫째", "둘째"], ["둘째만"]] and rows.answers == [["가", "나"], ["다"]]


def test_hansol_style_csv_keeps_physical_lines_across_multi_line_cells(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(
        HANSOL_HEADER
        + 'T0,벽지가 떠요,벽지 들뜸 원인,마감하자,"첫 줄\n둘째 줄\n셋째 줄",답2,,답4,답5\n'  # lines 2-4
        + "T1,곰팡이가 생겨요,,마감재,환기하세요,,,,\n"  # line 5: one phrasing, one reference
        + "\n"  # line 6: blank
        + ",질문만,,기타,답,,,,\n"  # line 7: no id
        + "T3,질문,,기타,답\n",  # line 8: too few cells
        encoding="utf-8")
    problems = problems_of(path, HANSOL)
    assert [(p.line, p.path) for p in problems] == [(7, str(path)), (8, str(path))]
    assert problems[0].message.startswith("id: missing")
    assert "expected 9 comma-separated cells" in problems[1].message and "found 5" in problems[1].message
    assert f"{path}:7: id" in str(DataError(problems))
    path.write_text(HANSOL_HEADER + 'T0,벽지가 떠요,벽지 들뜸 원인,마감하자,"첫 줄\n둘째 줄",답2,,답4,답5\n'
                    + "T1,곰팡이가 생겨요,,마감재,환기하세요,,,,\n", encoding="utf-8")
    rows = read_qa_rows(path, HANSOL)
    assert rows.ids == ["T0", "T1"]
    assert rows.questions == [["벽지가 떠요", "벽지 들뜸 원인"], ["곰팡이가 생겨요"]]
    assert rows.answers == [["첫 줄\n둘째 줄", "답2", "답4", "답5"], ["환기하세요"]]
    assert rows.groups == ["마감하자", "마감재"] and rows.contexts == [None, None]


def test_csv_test_file_has_one_question_column_and_no_answers(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("\ufeffid,질문\nTEST_000,도배는 언제 해?\nTEST_001,\"장판, 마루 중 뭐가 나아?\"\n", encoding="utf-8")
    rows = read_qa_rows(path, HANSOL)
    assert rows.answers is None and rows.questions == [["도배는 언제 해?"], ["장판, 마루 중 뭐가 나아?"]]
    assert rows.groups == [None, None]
    (p,) = problems_of(path, HANSOL, labelled=True)
    assert p.line == 1 and "답변_1" in p.message and "header" in p.message


def test_squad_contexts_groups_and_references(tmp_path):
    doc = {"version": "KorQuAD_v1.0", "data": [
        {"title": "도배", "paragraphs": [
            {"context": "도배는 벽에 종이를 바르는 일이다.", "qas": [
                {"id": "q1", "question": "도배는 무엇을 바르나?", "answers": [{"text": "종이", "answer_start": 7}]},
                {"id": "q2", "question": "무엇에 바르나?", "answers": [{"text": "벽", "answer_start": 4},
                                                                   {"text": "벽에", "answer_start": 4}]}]}]},
        {"title": "장판", "paragraphs": [{"context": "장판은 바닥재다.", "qas": [
            {"id": "q3", "question": "장판은?", "answers": [{"text": "바닥재", "answer_start": 4}]}]}]},
    ]}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    rows = read_qa_rows(path, KORQUAD)
    assert rows.ids == ["q1", "q2", "q3"]
    assert rows.questions == [["도배는 무엇을 바르나?"], ["무엇에 바르나?"], ["장판은?"]]
    assert rows.answers == [["종이"], ["벽", "벽에"], ["바닥재"]]
    assert rows.contexts == ["도배는 벽에 종이를 바르는 일이다."] * 2 + ["장판은 바닥재다."]
    assert rows.groups == ["도배", "도배", "장판"]
    assert read_qa_rows(path, KORQUAD, labelled=False).answers is None


# ---------------------------------------------------------------------------------------------
# every malformed case: a DataError naming file, line and field
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_line, field, expected", [
    ('{"id": "x", "question": ', "", r"malformed JSON \(.* at column \d+\)"),
    ("[1, 2]", "", "expected a JSON object, got list"),
    (json.dumps({"question": "q", "answers": ["a"]}), "id", "missing"),
    (json.dumps(item("  ")), "id", "missing or empty"),
    (json.dumps(item(True)), "id", "expected a string or an integer, got bool"),
    (json.dumps(item("ok1")), "id", r"duplicate id 'ok1' \(first seen at .*:1\)"),
    (json.dumps({"id": "x", "answers": ["a"]}), "question", "no non-empty question"),
    (json.dumps(item(question=["", " "])), "question", "no non-empty question"),
    (json.dumps(item(question=3)), "question", "expected a string or a list of strings, got int"),
    (json.dumps(item(question=["q", None])), r"question\[1\]", "expected a string, got null"),
    (json.dumps(item(answers=[1])), r"answers\[0\]", "expected a string or a {text} object, got int"),
    (json.dumps(item(answers=[{"text": 5}])), r"answers\[0\]\.text", "missing or not a string"),
    (json.dumps(item(answers=7)), "answers", "expected a string, a list"),
    (json.dumps(item(answers=[])), "answers", r"no non-empty reference answer \(the first row has answers\)"),
    (json.dumps({"id": "x", "question": "q"}), "answers", "no non-empty reference answer"),
    (json.dumps(item(context=["c"])), "context", "expected a string, got list"),
    (json.dumps(item(category=3)), "category", "expected a string, got int"),
])
def test_each_bad_jsonl_row_names_file_line_and_field(tmp_path, bad_line, field, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [item("ok1"), bad_line, item("ok2")])
    (p,) = problems_of(path)
    assert p.path == str(path) and p.line == 2
    assert re.match(rf"{field}: " if field else "", p.message) and re.search(expected, p.message), p.message
    assert f"{path}:2: " in str(DataError([p]))


@pytest.mark.parametrize("text, line, expected", [
    ("key,질문_1,답변_1\nx,q,a\n", 1, r"header: no id column 'id' \(found \['key', '질문_1', '답변_1'\]\)"),
    ("id,question,답변_1\nx,q,a\n", 1, r"header: none of the question columns \['질문_1', '질문_2', '질문'\]"),
    ("id,질문_1,질문_1,답변_1\nx,q,q,a\n", 1, r"header: repeated column\(s\) \['질문_1'\]"),
    ("id,질문_1,답변_1\nx,q,a\ny,q\n", 3, "expected 3 comma-separated cells"),
    ("id,질문_1,답변_1\nx,q,a\n ,q,a\n", 3, "id: missing or empty"),
    ("id,질문_1,질문_2,답변_1\nx,q,,a\ny, ,,a\n", 3, "질문_1/질문_2: no non-empty question"),
    ("id,질문_1,답변_1,답변_2\nx,q,a,\ny,q,,\n", 3, r"답변_1/답변_2: no non-empty reference answer"),
    ("id,질문_1,답변_1\nx,q,a\nx,q2,a\n", 3, r"id: duplicate id 'x' \(first seen at .*:2\)"),
])
def test_each_bad_csv_row_names_file_line_and_field(tmp_path, text, line, expected):
    path = tmp_path / "d.csv"
    path.write_text(text, encoding="utf-8")
    (p,) = problems_of(path, HANSOL)
    assert p.path == str(path) and p.line == line
    assert re.search(expected, p.message), p.message


def _squad(qa=None, context="맥락", title="제목", paragraphs=None):
    qa = qa if qa is not None else {"id": "q1", "question": "질문?", "answers": [{"text": "답", "answer_start": 0}]}
    paragraphs = paragraphs if paragraphs is not None else [{"context": context, "qas": [qa]}]
    return {"data": [{"title": "앞", "paragraphs": [{"context": "c", "qas": [
        {"id": "q0", "question": "첫 질문", "answers": [{"text": "첫 답", "answer_start": 0}]}]}]},
                     {"title": title, "paragraphs": paragraphs}]}


@pytest.mark.parametrize("doc, expected", [
    ({"version": 1}, r"^data: expected a list of articles"),
    (_squad({"question": "질문?", "answers": [{"text": "답"}]}), r"^data\[1\]\.paragraphs\[0\]\.qas\[0\]\.id: missing"),
    (_squad({"id": "q0", "question": "q", "answers": [{"text": "답"}]}),
     r"^data\[1\]\.paragraphs\[0\]\.qas\[0\]\.id: duplicate id 'q0' \(first seen at .*:0 data\[0\]"),
    (_squad({"id": "q1", "question": 5, "answers": [{"text": "답"}]}),
     r"^data\[1\]\.paragraphs\[0\]\.qas\[0\]\.question: expected a string"),
    (_squad({"id": "q1", "question": "q", "answers": []}),
     r"^data\[1\]\.paragraphs\[0\]\.qas\[0\]\.answers: no non-empty reference answer"),
    (_squad({"id": "q1", "question": "q", "answers": [{"answer_start": 0}]}),
     r"^data\[1\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]\.text: missing or not a string"),
    (_squad(context=None), r"^data\[1\]\.paragraphs\[0\]\.context: missing or not a string"),
    (_squad(title=["x"]), r"^data\[1\]\.title: expected a string, got list"),
    (_squad(paragraphs="x"), r"^data\[1\]\.paragraphs: expected a list, got str"),
    (_squad(paragraphs=[{"context": "c"}]), r"^data\[1\]\.paragraphs\[0\]\.qas: expected a list, got nothing"),
    (_squad(paragraphs=[{"context": "c", "qas": [3]}]), r"^data\[1\]\.paragraphs\[0\]\.qas\[0\]: expected an object"),
])
def test_each_bad_squad_item_is_at_line_0_with_its_json_path(tmp_path, doc, expected):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    (p,) = problems_of(path, KORQUAD)
    assert p.path == str(path) and p.line == 0
    assert re.search(expected, p.message), p.message


def test_malformed_squad_json_gives_its_line_and_column(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"data": [\n  {"title": "x",\n   "paragraphs": [}\n]}', encoding="utf-8")
    (p,) = problems_of(path, KORQUAD)
    assert p.line == 3 and re.search(r"malformed JSON \(.* at line 3 column \d+\)", p.message)


def test_unlabelled_squad_rows_are_fine_without_answers(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_squad({"id": "q1", "question": "q", "answers": [], "is_impossible": True})),
                    encoding="utf-8")
    with pytest.raises(DataError):
        read_qa_rows(path, KORQUAD)  # the first row has answers
    rows = read_qa_rows(path, KORQUAD, labelled=False)
    assert rows.ids == ["q0", "q1"] and rows.answers is None


def test_file_problems_not_utf8_missing_empty_and_unknown_format(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(item("a"), ensure_ascii=False).encode() + b"\n" + "결로".encode("cp949") + b"\n")
    (p,) = problems_of(bad)
    assert p.line == 2 and p.message.startswith("not UTF-8")
    (p,) = problems_of(tmp_path / "nowhere.jsonl")
    assert p.line == 0 and p.message == "file not found" and p.path.endswith("nowhere.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    (p,) = problems_of(empty)
    assert p.message == "no rows"
    (p,) = problems_of(empty, get_task("nikl-emotion"))
    assert "classify" in p.message and "nikl_ray.data.read_rows" in p.message
    unknown = TaskSpec.model_construct(name="odd", kind="generate", format="tsv", question_fields=["question"],
                                       answer_fields=["answers"], id_field="id", context_field=None, group_field=None)
    (p,) = problems_of(empty, unknown)
    assert "'tsv'" in p.message and "csv, jsonl, squad" in p.message


def test_every_bad_row_of_every_file_is_listed_and_nothing_is_written(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [item("x"), item("y", question=""), "{"])
    b = write_jsonl(tmp_path / "b.jsonl", [item("x"), item("z", answers=[])])
    before = sorted(tmp_path.iterdir())
    problems = problems_of([a, b, tmp_path / "c.jsonl"])
    assert [(Path(p.path).name, p.line) for p in problems] == [("a.jsonl", 2), ("a.jsonl", 3), ("b.jsonl", 1),
                                                                ("b.jsonl", 2), ("c.jsonl", 0)]
    assert f"first seen at {a}:1" in problems[2].message
    assert sorted(tmp_path.iterdir()) == before


def test_a_row_with_several_bad_fields_lists_each(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [item("a"), {"id": "", "question": 1, "answers": [2], "category": []}])
    assert [p.message.split(":")[0] for p in problems_of(path)] == ["id", "question", "category", "answers[0]"]


def test_labelled_modes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [item("a"), item("b", answers=5)])
    (p,) = problems_of(path)
    assert p.line == 2 and p.message.startswith("answers:")
    rows = read_qa_rows(path, QA, labelled=False)
    assert rows.answers is None and rows.ids == ["a", "b"]
    unlabelled_first = write_jsonl(tmp_path / "u.jsonl", [{"id": "a", "question": "q"}, item("b")])
    assert read_qa_rows(unlabelled_first, QA).answers is None
    (p,) = problems_of(unlabelled_first, labelled=True)
    assert p.line == 1 and p.message == "answers: no non-empty reference answer"


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------


def _rows(tmp_path, groups):
    rows = [item(f"r{i}", [f"질문 {i}", f"다른 질문 {i}"], [f"답 {i}"], context=f"맥락 {i}", category=g)
            for i, g in enumerate(groups)]
    for r in rows:
        if r["category"] is None:
            del r["category"]
    return read_qa_rows(write_jsonl(tmp_path / "r.jsonl", rows), QA)


def test_take_and_queries(tmp_path):
    rows = _rows(tmp_path, ["a", "b", "a"])
    sub = rows.take(np.array([2, 0]))
    assert sub.ids == ["r2", "r0"] and sub.answers == [["답 2"], ["답 0"]] and sub.groups == ["a", "a"]
    assert sub.questions == [["질문 2", "다른 질문 2"], ["질문 0", "다른 질문 0"]] and sub.records[0]["id"] == "r2"
    assert sub.data_hash() == rows.data_hash()
    queries = rows.queries()
    assert [q.id for q in queries] == ["r0#q0", "r0#q1", "r1#q0", "r1#q1", "r2#q0", "r2#q1"]
    assert queries[3] == Query("r1#q1", 1, "다른 질문 1", "맥락 1")
    assert [(q.id, q.item) for q in rows.queries([2])] == [("r2#q0", 2), ("r2#q1", 2)]
    assert [(q.id, q.item) for q in sub.queries()] == [("r2#q0", 0), ("r2#q1", 0), ("r0#q0", 1), ("r0#q1", 1)]
    with pytest.raises(AttributeError):
        queries[0].id = "x"


def test_data_hash_follows_the_files(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [item("a")])
    first = read_qa_rows(path, QA).data_hash()
    assert first == read_qa_rows(path, QA).data_hash() and len(first) == 64
    write_jsonl(path, [item("b")])
    assert read_qa_rows(path, QA).data_hash() != first


def test_strata_number_groups_and_folds_merge_the_rare_ones(tmp_path):
    from nikl_ray.folds import item_strata

    rows = _rows(tmp_path, ["벽지", "타일", "벽지", "희귀1", "타일", None, "희귀2", "타일"])
    # groups by name: 벽지 0, 타일 1, 희귀1 2, 희귀2 3; the row without a group: 4
    assert rows.strata().tolist() == [0, 1, 0, 2, 1, 4, 3, 1]
    # for 2 folds: groups of fewer than 2 items merge into one stratum
    s = item_strata(rows.strata(), 2).argmax(1)
    assert s[3] == s[5] == s[6] and s[0] == s[2] and s[1] == s[4] == s[7] and len({s[0], s[1], s[3]}) == 3
    lone = item_strata(_rows(tmp_path, ["벽지", "타일", "벽지", "희귀", "타일"]).strata(), 2).argmax(1)
    assert lone[3] == lone[0] and len(set(lone)) == 2  # alone even merged: into the largest group
    no_groups = read_qa_rows(write_jsonl(tmp_path / "n.jsonl", [item("a"), item("b")]),
                             TaskSpec(name="n", kind="generate", format="jsonl"))
    assert no_groups.strata().tolist() == [0, 0] and no_groups.strata().dtype.kind == "i"


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _hansol_rows(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text('id,질문\nTEST_000,도배는 언제?\nTEST_001,"장판, 마루?"\n', encoding="utf-8")
    return read_qa_rows(path, HANSOL)


def test_csv_answers_and_vectors_round_trip(tmp_path):
    rows = _hansol_rows(tmp_path)
    answers = ['봄에 합니다, "건조할 때"', "마루가\n낫습니다"]
    out = write_answers(rows, answers, tmp_path / "out" / "answers.csv")
    with open(out, encoding="utf-8", newline="") as f:
        assert list(csv.reader(f)) == [["id", "answer"], ["TEST_000", answers[0]], ["TEST_001", answers[1]]]
    vectors = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    out = write_vectors(rows, vectors, tmp_path / "submission.csv")
    with open(out, encoding="utf-8", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["id", "vec_0", "vec_1", "vec_2", "vec_3"] and [r[0] for r in table[1:]] == rows.ids
    np.testing.assert_array_equal(np.array([r[1:] for r in table[1:]], dtype=np.float32), vectors)
    out = write_answers(rows, answers, tmp_path / "both.csv", vectors=vectors)
    with open(out, encoding="utf-8", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:3] == ["id", "answer", "vec_0"] and table[2][1] == answers[1]
    np.testing.assert_array_equal(np.array([r[2:] for r in table[1:]], dtype=np.float32), vectors)


def test_jsonl_answers_round_trip(tmp_path):
    rows = _rows(tmp_path, ["a", "b"])
    out = write_answers(rows, ["첫 답", "둘째 답"], tmp_path / "answers.jsonl", vectors=np.eye(2))
    lines = out.read_text(encoding="utf-8").splitlines()
    assert "첫 답" in lines[0]  # ensure_ascii=False
    assert [json.loads(x) for x in lines] == [{"id": "r0", "answer": "첫 답", "vector": [1.0, 0.0]},
                                              {"id": "r1", "answer": "둘째 답", "vector": [0.0, 1.0]}]
    out = write_answers(rows, ["a", "b"], tmp_path / "plain.jsonl")
    assert [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] == [{"id": "r0", "answer": "a"},
                                                                                     {"id": "r1", "answer": "b"}]


@pytest.mark.parametrize("call", [
    lambda rows, p: write_answers(rows, ["only one"], p),
    lambda rows, p: write_answers(rows, ["a", None], p),
    lambda rows, p: write_answers(rows, ["a", "b"], p, vectors=np.zeros((3, 2))),
    lambda rows, p: write_vectors(rows, np.zeros(2), p),
    lambda rows, p: write_vectors(rows, np.array([[0.0, np.nan], [0.0, 0.0]]), p),
])
def test_writers_refuse_bad_input_and_leave_no_file(tmp_path, call):
    rows = _hansol_rows(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ValueError):
        call(rows, out_dir / "sub.csv")
    assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the shipped demo set and the real Hansol files
# ---------------------------------------------------------------------------------------------


def test_demo_files_read_cleanly_and_are_what_the_script_writes(tmp_path):
    train = read_qa_rows(DEMO_DIR / "qa_train.jsonl", DEMO)
    test = read_qa_rows(DEMO_DIR / "qa_test.jsonl", DEMO)
    assert len(train) == 120 and len(test) == 30 and test.answers is None
    assert all(len(q) == 2 for q in train.questions) and all(2 <= len(a) <= 3 for a in train.answers)
    assert all(len(q) == 1 for q in test.questions) and None not in train.groups
    assert not set(train.ids) & set(test.ids)
    assert len(np.unique(train.strata())) == len(set(train.groups)) >= 4
    for name in ("qa_train.jsonl", "qa_test.jsonl"):
        assert (DEMO_DIR / name).stat().st_size < 60_000
    spec = importlib.util.spec_from_file_location("make_qa_demo", HERE.parents[1] / "scripts" / "make_qa_demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(tmp_path)
    for name in ("qa_train.jsonl", "qa_test.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), f"rerun make_qa_demo.py ({name})"


@pytest.mark.skipif(not HANSOL_DIR.exists(), reason="../shared/data/hansol_qa is absent")
def test_real_hansol_files_read():
    train = read_qa_rows(HANSOL_DIR / "train.csv", HANSOL)
    test = read_qa_rows(HANSOL_DIR / "test.csv", HANSOL)
    assert len(train) == 516 and all(len(q) == 2 for q in train.questions)
    assert train.answers is not None and all(len(a) == 5 for a in train.answers)
    assert None not in train.groups and len(train.queries()) == 1032
    assert len(test) == 128 and test.answers is None and all(len(q) == 1 for q in test.questions)


# ---------------------------------------------------------------------------------------------
# arbitrary input only ever raises our validation error
# ---------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["jsonl", "csv", "squad"]))
def test_arbitrary_bytes_only_ever_raise_our_validation_error(tmp_path_factory, data, fmt):
    path = tmp_path_factory.mktemp("fuzz") / "d"
    path.write_bytes(data)
    task = {"jsonl": QA, "csv": HANSOL, "squad": KORQUAD}[fmt]
    try:
        read_qa_rows(path, task)
    except DataError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["text", "id", "question", "answers", "context", "qas", "paragraphs",
                                                "data", "title", "category"]), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=4))
def test_arbitrary_json_only_ever_raises_our_validation_error(tmp_path_factory, records):
    folder = tmp_path_factory.mktemp("fuzz")
    jsonl = write_jsonl(folder / "d.jsonl", [json.dumps(r) for r in records])
    squad = folder / "d.json"
    squad.write_text(json.dumps({"data": records}), encoding="utf-8")
    for path, task in ((jsonl, QA), (squad, KORQUAD)):
        try:
            rows = read_qa_rows(path, task)
        except DataError:
            continue
        assert all(rows.questions) and (rows.answers is None or all(rows.answers))
