import numpy as np
import pytest

from conftest import DEMO_DIR, NIKL_DIR, nikl_row, write_jsonl
from nikl_ray.data import read_rows
from nikl_ray.folds import FoldMismatchError, fold_rows, load_folds, make_folds, save_folds
from nikl_ray.tasks import get_task

NIKL = get_task("nikl-emotion")


def test_folds_are_deterministic_disjoint_and_cover_every_row():
    rows = read_rows(DEMO_DIR / "train.jsonl", NIKL)
    a, b = make_folds(rows, k=4, seed=1), make_folds(rows, k=4, seed=1)
    assert a == b
    assert make_folds(rows, k=4, seed=2)["folds"] != a["folds"]
    held = [i for f in a["folds"] for i in f]
    assert len(held) == len(set(held)) == len(rows)
    train, val = fold_rows(rows, a, 0)
    assert set(train.ids).isdisjoint(val.ids) and len(train) + len(val) == len(rows)


def test_reloading_a_manifest_against_changed_data_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [nikl_row(f"r{i}", labels=("joy",) if i % 2 else ("fear",)) for i in range(10)])
    rows = read_rows(path, NIKL)
    save_folds(make_folds(rows, k=2), tmp_path / "folds.json")
    assert load_folds(tmp_path / "folds.json", rows)["k"] == 2
    write_jsonl(path, [nikl_row(f"r{i}") for i in range(11)])
    with pytest.raises(FoldMismatchError, match="other data"):
        load_folds(tmp_path / "folds.json", read_rows(path, NIKL))


@pytest.mark.skipif(not NIKL_DIR.exists(), reason="../shared/data/nikl_ea_2023 is absent")
def test_real_nikl_folds_keep_every_label_rate_within_one_point():
    rows = read_rows([NIKL_DIR / "train.jsonl", NIKL_DIR / "dev.jsonl"], NIKL)
    manifest = make_folds(rows, k=5, seed=42)
    overall = rows.labels.mean(0)
    for fold in range(5):
        _, val = fold_rows(rows, manifest, fold)
        assert np.abs(val.labels.mean(0) - overall).max() < 0.01, (fold, val.labels.mean(0), overall)


def test_single_label_folds_are_stratified(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("id\tdocument\tlabel\n" + "".join(f"{i}\t문장 {i}\t{int(i % 4 == 0)}\n" for i in range(40)), encoding="utf-8")
    rows = read_rows(path, get_task("sentence-sentiment"))
    manifest = make_folds(rows, k=2)
    for fold in range(2):
        _, val = fold_rows(rows, manifest, fold)
        assert val.labels[:, 1].sum() == 5
