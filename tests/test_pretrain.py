"""Pretraining on unlabeled text: corpus readers, two Ray Train workers, a kill and a resume, and the
fold models starting from the pretrained weights."""

import json
import subprocess
import sys
import time
import unicodedata

import pytest
import yaml

from conftest import DEMO_DIR, kill_with_its_ray, package_logging_kept


def test_the_corpus_reads_jsonl_tsv_and_lines_normalised_deduplicated_and_leaves_out_what_it_is_told(tmp_path):
    from nikl_ray.backbones import CorpusSource
    from nikl_ray.corpus import read_corpus, split_heldout

    decomposed = unicodedata.normalize("NFD", "좋다")
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": 1, "input": {"form": "오늘 영화 좋다"}}, ensure_ascii=False) + "\n"
                                      + json.dumps({"text": f"날씨 {decomposed}"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("id\tdocument\tlabel\n1\t오늘 영화 좋다\t1\n2\t별로였다\t0\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("첫 줄\n\n날씨 좋다\n", encoding="utf-8")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "시험 문장"}, ensure_ascii=False) + "\n", encoding="utf-8")
    sources = [CorpusSource(path=str(tmp_path / n)) for n in ("a.jsonl", "b.txt", "c.txt", "test.jsonl")]
    texts, info = read_corpus(sources, exclude=[tmp_path / "test.jsonl"])
    assert texts == ["오늘 영화 좋다", "날씨 좋다", "별로였다", "첫 줄"]  # NFC, first occurrence kept, empty dropped
    assert info["left_out"] == [str(tmp_path / "test.jsonl")] and info["read"] == 6
    train, held = split_heldout([f"문장 {i}" for i in range(500)], 0.02, 0)
    assert len(held) == 10 and not set(train) & set(held) and split_heldout([f"문장 {i}" for i in range(500)], 0.02, 0)[1] == held


@pytest.mark.parametrize("kind, mlm", [("gpt_neox", False), ("electra", True)])
def test_packed_rows_are_full_blocks_of_every_text_in_order(tiny_backbones, kind, mlm):
    from transformers import AutoTokenizer

    from nikl_ray.data import read_rows
    from nikl_ray.pretraining import lm_dataset
    from nikl_ray.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbones[kind])
    texts = read_rows(DEMO_DIR / "train.jsonl", get_task("nikl-emotion")).texts[:300]
    packed = lm_dataset(tokenizer, texts, 32, packed=True, mlm=mlm)
    plain = lm_dataset(tokenizer, texts, 32, packed=False, mlm=mlm)
    rows = tokenizer(texts)["input_ids"]
    stream = [t for row in rows for t in row]
    blocks = packed["input_ids"]
    assert all(len(b) == 32 for b in blocks) and len(blocks) == len(stream) // 32  # one batch of texts: one tail dropped
    assert [t for b in blocks for t in b] == stream[:len(blocks) * 32]
    assert tokenizer.pad_token_id not in stream
    if mlm:  # each text between the encoder's own [CLS] … [SEP]
        assert all(row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id for row in rows)
    else:  # positions restart at each text (and at each block); a text's first token is no target
        starts = [i == 0 for row in rows for i in range(len(row))]
        flat_pos = [p for b in packed["position_ids"] for p in b]
        flat_labels = [t for b in packed["labels"] for t in b]
        assert all(p == 0 for p, st in zip(flat_pos, starts) if st)
        assert all(lab == -100 if st else lab == t for lab, t, st in zip(flat_labels, stream, starts))
    # the same tokens in far fewer rows than one padded row per text
    assert len(blocks) < len(plain) / 3 and sum(map(len, plain["input_ids"])) <= len(stream)
    assert len(plain) == len(texts) and max(map(len, plain["input_ids"])) <= 32  # packing: false is one cut row per text


def test_a_packed_causal_block_teaches_what_its_texts_teach_one_row_each(tiny_backbones):
    """No attention across texts: the block's loss is the mean of its whole texts' token losses, each
    text read alone, as the folds and the held-out perplexity read them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nikl_ray.pretraining import LMCollator, lm_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbones["gpt_neox"])
    model = AutoModelForCausalLM.from_pretrained(tiny_backbones["gpt_neox"]).eval()
    model.config.use_cache = False
    texts = ["오늘은 기분이 정말 좋다", "왜 이렇게 화가 나는지 모르겠어", "슬픈 영화를 봤다", "내일 또 보자"] * 4
    lengths = [len(r) for r in tokenizer(texts)["input_ids"]]
    whole = next(n for n in range(len(texts), 0, -1) if sum(lengths[:n]) <= 48)  # texts wholly in the block
    block = lm_dataset(tokenizer, texts, sum(lengths[:whole]), packed=True, mlm=False)
    batch = LMCollator(tokenizer, False, 0.15)([block[0]])
    with torch.no_grad():
        packed_loss = model(**batch).loss.item()
        alone = [model(**tokenizer(t, return_tensors="pt"), labels=tokenizer(t, return_tensors="pt")["input_ids"]).loss.item()
                 for t in texts[:whole]]
    expected = sum(loss * (n - 1) for loss, n in zip(alone, lengths)) / sum(n - 1 for n in lengths[:whole])
    assert packed_loss == pytest.approx(expected, rel=1e-4)
    model.config.use_cache = True  # with a cache HF drops the boundaries, and the texts see each other
    with torch.no_grad():
        assert model(**batch).loss.item() != pytest.approx(expected, rel=1e-4)


def _config(tmp_path, checkpoint: str) -> dict:
    corpus = [str(DEMO_DIR / "train.jsonl"), str(DEMO_DIR / "test.jsonl")]  # the task's test file: left out
    return {"task": "nikl-emotion", "train": str(DEMO_DIR / "train.jsonl"), "test": str(DEMO_DIR / "test.jsonl"),
            "results": str(tmp_path / "res"), "folds": {"k": 2, "seed": 0},
            "ensemble": {"hidden_sizes": [16], "inner_folds": 2, "epochs": 20, "patience": 5},
            "backbones": [{"name": "neox", "checkpoint": checkpoint, "mode": "lora", "epochs": 1, "lr": 5e-3,
                           "pretrain": {"corpus": corpus, "steps": 80, "batch_size": 16, "max_length": 40,
                                        "save_every_steps": 20}}]}


def _registered(run_dir) -> bool:
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text()).get("latest_checkpoint_result") is not None
    except (OSError, json.JSONDecodeError):
        return False


@pytest.mark.slow
def test_pretraining_runs_two_workers_resumes_after_a_kill_and_the_folds_start_from_it(tmp_path, ray_local,
                                                                                        tiny_backbones, cli):
    import runpy

    import numpy as np
    from transformers import AutoModel

    from nikl_ray import open_run
    from nikl_ray.artifacts import load_manifest
    from nikl_ray.backbones import load_for_classification, load_tokenizer

    raw = _config(tmp_path, str(tiny_backbones["gpt_neox"]))  # the session's random init: built once
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "res" / "pretrain" / "neox" / "neox-pretrain"
    cmd = [sys.executable, "-m", "nikl_ray.cli", "pretrain", "--config", str(config), "--local", "--num-cpus", "2"]
    log = open(tmp_path / "pretrain.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not _registered(run_dir):
            assert proc.poll() is None, (tmp_path / "pretrain.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        kill_with_its_ray(proc)  # the driver and the Ray instance it started
    assert not (tmp_path / "res" / "pretrain" / "neox" / "manifest.json").exists()

    code, _, err = cli("pretrain", "--config", config, "--local")  # the same command again: resumed, not started over
    assert code == 0, err
    manifest = json.loads((tmp_path / "res" / "pretrain" / "neox" / "manifest.json").read_text())
    assert manifest["steps"] == 80 and manifest["resumed_from_step"] > 0
    assert sorted(w["rank"] for w in manifest["workers"]) == [0, 1] and all(w["steps"] > 0 for w in manifest["workers"])
    losses = [c["loss"] for c in manifest["loss_curve"]]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    assert manifest["corpus"]["left_out"] == [str(DEMO_DIR / "test.jsonl")]
    # each rank checkpoints into a folder of its own, so no rank reports files another is writing
    assert sorted(p.name for p in (run_dir / "hf").iterdir()) == ["rank0", "rank1"]
    merged = sorted(run_dir.glob("checkpoint_*/checkpoint"))[-1]
    assert json.loads((merged / "config.json").read_text())["model_type"] == "gpt_neox"
    assert sorted(p.name for p in merged.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert (tmp_path / "res" / "pretrain" / "neox" / "report.md").exists()
    # rank 0 tracked it (TensorBoard, the default), the killed attempt and the resumed one into the same folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) >= 3 and events.Scalars("heldout/perplexity")
    assert len(list((run_dir / "tensorboard").glob("events.*"))) <= 2  # one writer per attempt: rank 1 logs nothing

    # the fold models start from the pretrained weights, not from the random init
    spec = open_run(raw).exp.backbones[0]
    assert spec.checkpoint == str(tmp_path / "res" / "pretrain" / "neox" / "model")
    model = load_for_classification(spec, 8, True, load_tokenizer(spec))
    body = {k.split("gpt_neox.", 1)[1].replace("base_layer.", ""): v for k, v in model.state_dict().items()
            if "gpt_neox." in k and "lora" not in k}
    pretrained = AutoModel.from_pretrained(spec.checkpoint).state_dict()
    random_init = AutoModel.from_pretrained(raw["backbones"][0]["checkpoint"]).state_dict()
    layers = [k for k in body if k in pretrained and k.startswith("layers.") and body[k].shape == pretrained[k].shape]
    assert len(layers) > 10, sorted(body)[:20]
    for k in layers:  # at step 0, the classifier's body is the pretrained body
        np.testing.assert_array_equal(body[k].numpy(), pretrained[k].numpy(), err_msg=k)
    assert any(not np.array_equal(pretrained[k].numpy(), random_init[k].numpy()) for k in layers)

    # the later stages as separate commands train from it too; the pipeline, and the train job, then run nothing
    for stage in ("train", "features", "ensemble"):
        code, _, err = cli(stage, "--config", config, "--local")
        assert code == 0, (stage, err)
    for fold in range(2):
        assert load_manifest(tmp_path / "res" / "train" / f"neox-fold{fold}")["inputs"]["backbone"]["checkpoint"] == spec.checkpoint
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "res").rglob("manifest.json")}
    assert cli("pipeline", "--config", config, "--local")[0] == 0
    job = DEMO_DIR.parents[1] / "ray_jobs" / "train_folds.py"
    argv, sys.argv = sys.argv, [str(job), "--config", str(config), "--local"]
    try:
        with pytest.raises(SystemExit) as done, package_logging_kept():
            runpy.run_path(str(job), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "res").rglob("manifest.json")}
