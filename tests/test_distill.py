"""Distilling the trained fixture's finished run into one student: trained through real Ray Train on
the ensemble's out-of-fold probabilities (and a pool the run labels), scored out of fold beside
it, exported to ONNX and int8 ONNX (onnxruntime) and served alone on real Ray Serve."""

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def distilled(stacked):
    """The stacked run's student: its GPT-NeoX fine-tuned in full (the tiny encoder learns nothing in a
    few epochs), the test rows as an unlabelled pool. (exp, data, report path)."""
    from nikl_ray.config import DistillConfig
    from nikl_ray.stages import distill

    exp, data, _ = stacked
    exp = exp.model_copy(update={"distill": DistillConfig(student="neox-lora", overrides={"lr": 1e-3, "epochs": 4},
                                                          pool=[exp.test])})
    return exp, data, distill.run(exp, data)


def test_the_student_is_scored_out_of_fold_beside_the_ensemble_and_reruns_skip(distilled, caplog):
    """Cross-fitted students give every labelled row an out-of-fold probability; the teacher's and each
    member's scores are the ensemble report's (same rows, rules, inner folds); a rerun trains nothing."""
    from nikl_ray.artifacts import read_json
    from nikl_ray.stages import distill

    exp, data, report_path = distilled
    layout = exp.layout
    report, ensemble = read_json(layout.distill / "report.json"), read_json(layout.report_json)
    assert report["teacher"] == ensemble["chosen"]["name"]
    for name, score in report["scores"].items():
        if name != "student":
            assert score["score"] == pytest.approx(ensemble["crossfit_score"][name]), name
    oof = np.load(layout.distill / "oof.npy")
    assert oof.shape == data.rows.labels.shape and (oof.sum(1) > 0).all()  # every row predicted by a student
    assert report["pool_rows"] == len(data.test)
    # it learned more than the constant the degenerate encoder member answers with
    assert report["scores"]["enc-full"]["score"] < report["scores"]["student"]["score"] <= 1
    names = sorted(p.name for p in (layout.distill / "runs").iterdir())
    assert names == ["neox-lora-student", "neox-lora-student-fold0", "neox-lora-student-fold1"]
    assert "Distilled student" in report_path.read_text(encoding="utf-8")
    before = (layout.distill / "manifest.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="nikl_ray"):
        distill.run(exp, data)
    assert "done already" in caplog.text and (layout.distill / "manifest.json").stat().st_mtime_ns == before


def test_each_exported_form_answers_as_the_student_does(distilled):
    """fp32 ONNX within 1e-4 of the torch student's probabilities, int8 within 0.05, on rows none of
    them was checked on when exported; each answer says which form gave it."""
    from nikl_ray.predictor import Predictor

    exp, data, _ = distilled
    rows = data.test.inputs()
    fp32 = Predictor.load(exp.results, student=True)
    reference = fp32.predict(rows)
    assert reference.candidate == "student" and reference.probs.shape == (len(rows), len(exp.task.labels))
    for form, tolerance in (("onnx", 1e-4), ("int8", 0.05)):
        out = Predictor.load(exp.results, student=form).predict(rows)
        assert np.abs(out.probs - reference.probs).max() <= tolerance, form
    answer = Predictor.load(exp.results, student="int8").answer(fp32.rows_of(["오늘 영화 너무 좋다"]))[0]
    assert answer["student"] == "int8" and answer["candidate"] == "student"


def test_a_cut_short_or_garbled_export_is_refused_by_name(distilled, tmp_path):
    from nikl_ray.artifacts import read_json, sha256_file
    from nikl_ray.export import ExportError, load_session

    exp, _, _ = distilled
    made = read_json(exp.layout.student_record)["exports"]["int8"]
    cut = tmp_path / "student.int8.onnx"
    shutil.copy(exp.layout.distill / made["file"], cut)
    cut.write_bytes(cut.read_bytes()[: made["bytes"] // 2])
    with pytest.raises(ExportError, match="student.int8.onnx was truncated or altered"):
        load_session(cut, made["sha256"])
    garbled = tmp_path / "garbled.onnx"
    garbled.write_bytes(b"\x08\x07" + bytes(range(256)) * 8)
    with pytest.raises(ExportError, match="garbled.onnx is not a model onnxruntime can run"):
        load_session(garbled, sha256_file(garbled))
    with pytest.raises(ExportError, match="missing"):
        load_session(tmp_path / "absent.onnx", made["sha256"])


def test_the_served_student_answers_as_predictor_load_does(distilled, cli):
    """`serve --student` answers over HTTP as Predictor.load(student=True) does (the same labels; the
    probabilities to float32 rounding: torch's thread count differs in a replica), says so in
    /health and every answer, refuses an empty row with a 400; `predict --student int8`
    prints the int8 form's answer."""
    import urllib.request

    from ray import serve

    from conftest import free_port
    from nikl_ray.predictor import Predictor
    from nikl_ray.serve import deploy
    from test_use import _post

    exp, data, _ = distilled
    predictor = Predictor.load(exp.results, student=True)
    url = deploy(exp.results, port=free_port(), student="fp32")
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=30) as answer:
            health = json.loads(answer.read())
        texts = ["오늘 경기 보고 진짜 너무 무서워", data.test.texts[0]]
        for text in texts:
            status, answer = _post(f"{url}/predict", {"text": text})
            expected = predictor.answer(predictor.rows_of([text]))[0]
            assert status == 200 and {k: answer[k] for k in expected if k != "probabilities"} == {
                k: v for k, v in expected.items() if k != "probabilities"}
            assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        status, answer = _post(f"{url}/predict", {"text": "   "})
        assert status == 400
    finally:
        serve.shutdown()
    assert health["ready"] and health["student"] == "fp32" and health["candidate"] == "student"
    code, out, err = cli("predict", "--results", exp.results, "--student", "int8", "--text", texts[0], "--json")
    assert code == 0, err
    expected = Predictor.load(exp.results, student="int8").answer(predictor.rows_of(texts[:1]))[0]
    assert json.loads(out) == json.loads(json.dumps(expected))
