"""`nikl-ray status` on a results root: stages done, a run cut off, a run failed; text and JSON."""

import json
import shutil

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_status_says_which_stages_are_done_and_which_run_was_cut_off(stacked, tmp_path, cli):
    exp = stacked[0]
    results = tmp_path / "res"
    shutil.copytree(exp.results, results)
    (results / "train" / "neox-qlora-fold1" / "manifest.json").unlink()  # killed before it finished
    (results / "ensemble" / "manifest.json").unlink()
    shutil.rmtree(results / "distill", ignore_errors=True)  # test_distill's student, when it ran first
    raw = {"task": "nikl-emotion", "train": [str(p) for p in exp.train], "test": str(exp.test), "results": str(results),
           "folds": exp.folds.model_dump(), "backbones": [{"name": b.name, "checkpoint": b.checkpoint, "mode": b.mode}
                                                          for b in exp.backbones]}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(raw))

    code, out, err = cli("status", "--config", config, "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["stages"] == {"split": "done", "pretrain": "not configured", "tune": "not configured", "train": "cut off", "features": "done",
                                "ensemble": "pending", "distill": "not run"}
    assert status["runs"]["neox-qlora-fold1"]["state"] == "cut off" and status["runs"]["neox-qlora-fold1"]["epochs"] >= 1
    assert all(r["state"] == "done" for n, r in status["runs"].items() if n != "neox-qlora-fold1")
    assert status["runs"]["enc-full-fold0"]["degenerate"] and not status["failed"]

    text = cli("status", "--config", config)[1]
    assert "train cut off" in text and "ensemble pending" in text and "| neox-qlora-fold1 | cut off |" in text

    (results / "train" / "neox-qlora-fold1" / "failed.json").write_text(json.dumps({"error": "CUDA out of memory"}))
    code, out, _ = cli("status", "--config", config)
    assert code == 1 and "FAILED: neox-qlora-fold1" in out and "CUDA out of memory" in out
