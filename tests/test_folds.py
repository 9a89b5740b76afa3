import numpy as np
import pytest

from conftest import DEMO_DIR, NIKL_DIR, nikl_row, write_jsonl
from nikl_ray.data import read_rows
from nikl_ray.folds import fold_positions, make_folds
from nikl_ray.tasks import get_task

NIKL = get_task("nikl-emotion")


def test_folds_are_deterministic_disjoint_and_cover_every_row():
    rows = read_rows(DEMO_DIR / "train.jsonl", NIKL)
    a, b = make_folds(rows, k=4, seed=1, selection=0.1), make_folds(rows, k=4, seed=1, selection=0.1)
    assert a == b
    assert make_folds(rows, k=4, seed=2)["folds"] != a["folds"]
    held = [i for f in a["folds"] for i in f]
    assert len(held) == len(set(held)) == len(rows)
    train, select, val = fold_positions(rows, a, 0)
    assert len(train) + len(select) + len(val) == len(rows)
    assert not (set(train) & set(select)) and not (set(val) & (set(train) | set(select)))
    assert len(select) == pytest.approx(0.1 * (len(rows) - len(val)), abs=2)  # a tenth of the training part


def test_the_split_stage_reuses_matching_folds_and_remakes_them_for_changed_data(tmp_path):
    from nikl_ray.config import parse_experiment
    from nikl_ray.stages import split

    path = write_jsonl(tmp_path / "d.jsonl", [nikl_row(f"r{i}", labels=("joy",) if i % 2 else ("fear",)) for i in range(10)])
    exp = parse_experiment({"task": "nikl-emotion", "train": str(path), "results": str(tmp_path / "res"), "folds": {"k": 2},
                            "backbones": [{"name": "a", "checkpoint": "tiny:electra"}]})
    first = split.run(exp, read_rows(path, NIKL))
    stamp = (exp.layout.split / "manifest.json").stat().st_mtime_ns
    assert split.run(exp, read_rows(path, NIKL)) == first and (exp.layout.split / "manifest.json").stat().st_mtime_ns == stamp
    write_jsonl(path, [nikl_row(f"r{i}", labels=("joy",) if i % 2 else ("fear",)) for i in range(11)])
    again = split.run(exp, read_rows(path, NIKL))
    assert again["n_rows"] == 11 and again["data_hash"] != first["data_hash"]


@pytest.mark.skipif(not NIKL_DIR.exists(), reason="../shared/data/nikl_ea_2023 is absent")
def test_real_nikl_folds_keep_every_label_rate_within_one_point():
    rows = read_rows([NIKL_DIR / "train.jsonl", NIKL_DIR / "dev.jsonl"], NIKL)
    manifest = make_folds(rows, k=5, seed=42)
    overall = rows.labels.mean(0)
    for fold in range(5):
        _, _, val = fold_positions(rows, manifest, fold)
        assert np.abs(rows.labels[val].mean(0) - overall).max() < 0.01, (fold, rows.labels[val].mean(0), overall)


def test_single_label_folds_are_stratified(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("id\tdocument\tlabel\n" + "".join(f"{i}\t문장 {i}\t{int(i % 4 == 0)}\n" for i in range(40)), encoding="utf-8")
    rows = read_rows(path, get_task("sentence-sentiment"))
    manifest = make_folds(rows, k=2)
    for fold in range(2):
        _, _, val = fold_positions(rows, manifest, fold)
        assert rows.labels[val][:, 1].sum() == 5
