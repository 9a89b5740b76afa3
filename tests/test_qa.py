"""Generative QA as a task family of the same system: folds by item, causal-LM SFT on real tiny
decoders (the loss on answer tokens only; prefix tuning trains only the prefix), a real pipeline
on Ray Train with the retrieval member and MBR, the finished run answering through the
Predictor, the command line and Ray Serve, and a killed QA run resuming."""

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from nikl_ray.tasks import TaskSpec

DEMO = Path(__file__).resolve().parents[1] / "nikl_ray" / "demo_data"
TASK = {"name": "qa-demo", "kind": "generate", "format": "jsonl", "group_field": "category", "metric": "char_f1"}


def demo_rows(n=None):
    from nikl_ray.qa.data import read_qa_rows

    rows = read_qa_rows(DEMO / "qa_train.jsonl", TaskSpec(**TASK))
    return rows if n is None else rows.take(range(n))


# ---------------------------------------------------------------------------- no Ray
def test_every_phrasing_and_answer_of_an_item_stays_in_its_fold_and_prompts_never_reach_across():
    """The leak test: a fold's training pairs (their prompts with retrieved items, and their answers)
    hold no text of a held-out item, nor of a selection item; a held-out question's prompt retrieves
    only items its fold model trains on; folds are stratified by category."""
    from nikl_ray.folds import fold_positions, make_folds
    from nikl_ray.qa.data import queries
    from nikl_ray.qa.sft import Prompter
    from nikl_ray.tiny import make_tokenizer

    rows = demo_rows()
    folds = make_folds(rows, k=3, seed=0, selection=0.15)
    tokenizer = make_tokenizer("gpt_neox", ["질문 답변"], 300)
    shares, checked = [], 0
    for f in range(3):
        train, select, held = fold_positions(rows, folds, f)
        assert not (set(train) & set(held)) and not (set(select) & set(held)) and not (set(train) & set(select))
        prompter = Prompter(tokenizer, rows.questions, rows.answers, train, k=2)
        training_text = "\n".join(p + a for q, p in zip(queries(rows.ids, rows.questions, rows.contexts, train),
                                                        prompter.prompts(queries(rows.ids, rows.questions, rows.contexts, train), own_item=True))
                                  for a in rows.answers[q.item])
        for i in list(held) + list(select):
            for text in rows.questions[i] + rows.answers[i]:
                if not any(text in rows.questions[j] + rows.answers[j] for j in train):  # a template twin is not a leak
                    assert text not in training_text, (f, rows.ids[i], text)
                    checked += 1
        held_q = queries(rows.ids, rows.questions, rows.contexts, held)
        for near in prompter.retriever.nearest([q.question for q in held_q], 2):
            assert set(near) <= set(train)
        for q, near in zip(queries(rows.ids, rows.questions, rows.contexts, train),
                           prompter.retriever.nearest([q.question for q in queries(rows.ids, rows.questions, rows.contexts, train)],
                                                      2, [q.item for q in queries(rows.ids, rows.questions, rows.contexts, train)])):
            assert q.item not in near  # a training pair never retrieves its own item
        shares.append(np.mean([rows.groups[i] == "마감재" for i in held]))
    assert checked > 0.9 * sum(len(rows.questions[i]) + len(rows.answers[i]) for i in range(len(rows)))  # nearly all were checked
    overall = np.mean([g == "마감재" for g in rows.groups])
    assert max(abs(s - overall) for s in shares) < 0.05, (shares, overall)


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    from nikl_ray.run import task_texts
    from nikl_ray.tiny import make_tiny_backbone

    return make_tiny_backbone("gpt_neox", task_texts(demo_rows()), tmp_path_factory.mktemp("neox"), vocab_size=1000)


def _spec(checkpoint, **kw):
    from nikl_ray.backbones import BackboneSpec

    return BackboneSpec(name="b", checkpoint=str(checkpoint), target_encoding="none", max_length=64, max_new_tokens=24, **kw)


def test_the_loss_counts_the_answer_tokens_only(neox):
    """Labels are -100 on every prompt position; the model's loss is the cross-entropy of the answer's
    tokens alone, whatever the prompt's own tokens would cost."""
    import torch
    import torch.nn.functional as F

    from nikl_ray.backbones import load_for_generation, load_tokenizer
    from nikl_ray.qa.sft import IGNORE, encode_pair

    spec = _spec(neox)
    tokenizer = load_tokenizer(spec)
    model = load_for_generation(spec, tokenizer).eval()
    pair = encode_pair(tokenizer, "질문: 벽지 들뜸은 왜 생기나요?\n답변:", "습기 때문입니다.", 64, 24)
    prompt_len = len(tokenizer("질문: 벽지 들뜸은 왜 생기나요?\n답변:")["input_ids"])
    labels = torch.tensor([pair["labels"]])
    assert (labels[0, :prompt_len] == IGNORE).all() and (labels[0, prompt_len:] != IGNORE).all()
    assert pair["labels"][-1] == tokenizer.eos_token_id
    ids = torch.tensor([pair["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        logits = out.logits[0, :-1]
    target = ids[0, 1:]
    answer = F.cross_entropy(logits[prompt_len - 1:], target[prompt_len - 1:])
    everything = F.cross_entropy(logits, target)
    assert out.loss.item() == pytest.approx(answer.item(), rel=1e-5)
    assert abs(everything.item() - answer.item()) > 1e-3  # the prompt's tokens would have counted otherwise


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_mode_trains_only_the_prefix_and_its_loss_falls(neox, projection):
    import torch

    from nikl_ray.backbones import load_for_generation, load_tokenizer
    from nikl_ray.qa.sft import encode_pair

    spec = _spec(neox, mode="prefix", prefix_tokens=4, prefix_projection=projection, prefix_hidden=32)
    tokenizer = load_tokenizer(spec)
    model = load_for_generation(spec, tokenizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("prompt_encoder" in n for n in trainable), trainable
    assert any("transform" in n for n in trainable) == projection
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rows = demo_rows(8)
    batch = [encode_pair(tokenizer, f"질문: {q[0]}\n답변:", a[0], 64, 24) for q, a in zip(rows.questions, rows.answers)]
    width = max(len(b["input_ids"]) for b in batch)
    pad = lambda key, v: [b[key] + [v] * (width - len(b[key])) for b in batch]  # noqa: E731
    inputs = {"input_ids": torch.tensor(pad("input_ids", tokenizer.pad_token_id)),
              "attention_mask": torch.tensor(pad("attention_mask", 0)), "labels": torch.tensor(pad("labels", -100))}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2 if projection else 3e-1)
    losses = []
    model.train()
    for _ in range(25):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1 and min(losses) == losses[-1], losses  # a frozen random model: slowly
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def _resume_gap(neox, tmp_path, trainer_cls, *, prefix_projection: bool = False) -> float:
    """How far a run stopped after its first epoch and resumed ends from one trained straight through."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainerCallback, TrainingArguments

    from nikl_ray.backbones import quiet_transformers

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(neox)
    rows = demo_rows(32)
    texts = [q[0] + " " + a[0] for q, a in zip(rows.questions, rows.answers)]
    ds = datasets.Dataset.from_list([{**tok(t), "labels": tok(t)["input_ids"]} for t in texts])

    class StopAfterOneEpoch(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kw):
            control.should_training_stop = True

    def model():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(neox)
        if not prefix_projection:
            return base
        from peft import PrefixTuningConfig, get_peft_model

        return get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                                       encoder_hidden_size=32))

    def fit(out, resume=False, stop=False):
        args = TrainingArguments(str(tmp_path / out), num_train_epochs=2, per_device_train_batch_size=8, save_strategy="epoch",
                                 report_to="none", use_cpu=True, seed=1, learning_rate=3e-3, disable_tqdm=True)
        trainer = trainer_cls(model=model(), args=args, train_dataset=ds, data_collator=DataCollatorForSeq2Seq(tok),
                              callbacks=[StopAfterOneEpoch()] if stop else [])
        trainer.train(resume_from_checkpoint=str(next((tmp_path / out).glob("checkpoint-*"))) if resume else None)
        return {k: v for k, v in trainer.model.state_dict().items()}

    whole = fit(f"{trainer_cls.__name__}-whole")
    fit(trainer_cls.__name__, stop=True)
    resumed = fit(trainer_cls.__name__, resume=True)
    return max(float((resumed[k] - whole[k]).abs().max()) for k in whole)


def test_a_resumed_gpt_neox_causal_lm_gets_its_own_head_back(neox, tmp_path):
    """transformers 5 saves a GPT-NeoX causal LM's `lm_head` as `embed_out` and its Trainer's resume
    loads the state dict as saved: plain HF Trainer resumes with the head it started from, the fold
    runs' Trainer (worker.trainer_class) with the checkpoint's, and ends as an uninterrupted run."""
    from transformers import Trainer

    from nikl_ray.worker import trainer_class

    assert _resume_gap(neox, tmp_path, trainer_class()) == 0.0
    assert _resume_gap(neox, tmp_path, Trainer) > 1e-3


def test_a_reparametrised_prefix_resumes_from_its_own_encoder(neox, tmp_path):
    """peft saves a projected prefix only as the MLP's output: plain HF Trainer cannot resume it; the
    fold runs' Trainer keeps the MLP in each checkpoint and ends as an uninterrupted run."""
    from transformers import Trainer

    from nikl_ray.worker import ENCODER, trainer_class

    assert _resume_gap(neox, tmp_path, trainer_class(), prefix_projection=True) == 0.0
    assert all((c / ENCODER).exists() for c in (tmp_path / trainer_class().__name__).glob("checkpoint-*"))
    with pytest.raises(RuntimeError, match="size mismatch"):
        _resume_gap(neox, tmp_path / "plain", Trainer, prefix_projection=True)


def test_generate_tasks_refuse_what_they_cannot_run(tmp_path, tiny_backbones):
    from nikl_ray.config import ConfigError, parse_experiment

    train = str(DEMO / "qa_train.jsonl")
    with pytest.raises(ConfigError, match="needs a decoder"):
        parse_experiment({"task": TASK, "train": train, "backbones": [{"name": "e", "checkpoint": str(tiny_backbones["electra"])}]})
    with pytest.raises(ConfigError, match="mode prefix is for generate tasks"):
        parse_experiment({"task": "nikl-emotion", "train": str(DEMO / "train.jsonl"),
                          "backbones": [{"name": "p", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "prefix"}]})
    with pytest.raises(ConfigError, match="no labels"):
        parse_experiment({"task": {**TASK, "labels": ["a", "b"]}, "train": train,
                          "backbones": [{"name": "d", "checkpoint": str(tiny_backbones["gpt_neox"])}]})


def test_the_plan_counts_the_prefix_and_the_kv_cache_of_answering():
    from nikl_ray.placement import ModelShape, estimate_memory_bytes

    shape = ModelShape(params=1.3e9, hidden=2048, layers=24, heads=16, intermediate=8192, vocab=30000)
    base = estimate_memory_bytes(shape, mode="prefix", batch_size=8, max_length=256, prefix_tokens=16)
    longer = estimate_memory_bytes(shape, mode="prefix", batch_size=8, max_length=256, prefix_tokens=16, generate_tokens=256)
    projected = estimate_memory_bytes(shape, mode="prefix", batch_size=8, max_length=256, prefix_tokens=16, prefix_hidden=0)
    kv = 2 * 24 * 2048 * (256 + 16 + 256) * 16 * 2 * 1.10
    assert longer - base == pytest.approx(kv, rel=1e-9)
    assert projected > base  # the projection MLP trains too


# ---------------------------------------------------------------------------- a real pipeline
@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, ray_local):
    """A QA pipeline through real Ray Train on 36 demo items (2 folds): GPT-NeoX fully fine-tuned,
    Llama prefix-tuned (with its projection) with retrieval in its prompts and a sampled answer
    beside each greedy one, the retrieval member, MBR. (run, pipeline out)."""
    import nikl_ray as nr

    data = tmp_path_factory.mktemp("qa_data")
    for name, n in (("qa_train.jsonl", 36), ("qa_test.jsonl", 8)):
        (data / name).write_text("".join((DEMO / name).read_text(encoding="utf-8").splitlines(True)[:n]), encoding="utf-8")
    raw = {"task": TASK, "train": str(data / "qa_train.jsonl"), "test": str(data / "qa_test.jsonl"),
           "results": str(tmp_path_factory.mktemp("qa_results")), "folds": {"k": 2, "seed": 0, "selection": 0.2},
           "defaults": {"epochs": 3, "batch_size": 16, "max_length": 64, "max_new_tokens": 24, "lr": 3e-3,
                        "early_stopping_patience": 3},
           "backbones": [{"name": "neox-full", "checkpoint": "tiny:gpt_neox", "mode": "full"},
                         {"name": "llama-prefix", "checkpoint": "tiny:llama", "mode": "prefix", "prefix_tokens": 4,
                          "prefix_projection": True, "prefix_hidden": 32, "epochs": 2, "retrieve": {"k": 1}, "lr": 1e-2,
                          "samples": 1}],
           "ensemble": {"inner_folds": 2}, "retrieval_items": 2}
    run = nr.open_run(raw)
    return run, nr.pipeline(run)


def _submitted(path: Path) -> dict:
    return {r["id"]: r["answer"] for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


@pytest.mark.slow
def test_a_qa_pipeline_answers_every_question_and_submits_the_best_out_of_fold(qa_run):
    from nikl_ray.artifacts import read_json

    run, out = qa_run
    layout, report = run.layout, read_json(run.layout.report_json)
    assert report["members"] == ["neox-full", "llama-prefix", "retrieval"]
    assert report["questions"] == 72  # every phrasing of every item, each answered out of fold
    scores = report["oof_score"]
    assert {"mbr", "mbr-top"} <= set(scores) and report["chosen"]["name"] == max(report["candidates"], key=scores.get)
    assert out["chosen"] == report["chosen"]["name"]
    test_ids = [json.loads(line)["id"] for line in (Path(run.config.test)).read_text().splitlines()]
    for name in report["candidates"]:
        assert list(_submitted(layout.candidate_submission(name, ".jsonl"))) == test_ids
    assert _submitted(layout.submission(".jsonl")) == _submitted(layout.candidate_submission(report["chosen"]["name"], ".jsonl"))
    sampled = json.loads((layout.features("llama-prefix", 0) / "oof_answers.json").read_text())["answers"][0]
    assert len(sampled) == 2 and sampled[0][1] is None and sampled[1][1] < 0  # greedy, then a sample's mean log-prob
    table = (layout.train / "summary.md").read_text()
    assert "held-out char_f1" in table and "llama-prefix" in table
    md = layout.report.read_text()
    assert "## Example answers" in md and "마감재" in md  # per-category scores


@pytest.mark.slow
def test_a_finished_qa_run_answers_a_test_question_as_its_submission_did(qa_run, cli):
    """Predictor.load gives the QA predictor; each test question, asked alone, is routed to the fold
    models that answered it in the submission and gets the same answer; the command line says the same."""
    from nikl_ray.predictor import BadRequest, Predictor

    run, _ = qa_run
    p = Predictor.load(run.results)
    assert p.task.generates and p.candidate == _read_report(run)["chosen"]["name"]
    rows = [json.loads(line) for line in Path(run.config.test).read_text().splitlines()]
    submitted = {n: _submitted(run.layout.candidate_submission(n, ".jsonl")) for n in p.candidates}
    for name in p.candidates:
        got = p.generate([r["question"] for r in rows], candidate=name)
        assert [g["answer"] for g in got] == [submitted[name][r["id"]] for r in rows], name
    one = p.generate([rows[0]["question"]])[0]
    assert one["answer"] in [c["answer"] for c in one["candidates"]] and one["member"] in p.record["decision"]["members"]
    with pytest.raises(BadRequest, match="no candidate"):
        p.generate(["질문"], candidate="nope")
    code, stdout, _ = cli("predict", "--results", str(run.results), "--text", rows[0]["question"], "--json")
    assert code == 0 and json.loads(stdout)["answer"] == submitted[p.candidate][rows[0]["id"]]
    with pytest.raises(SystemExit, match="explain is for classify runs"):
        cli("explain", "--results", str(run.results), "--text", "x")


def _read_report(run):
    from nikl_ray.artifacts import read_json

    return read_json(run.layout.report_json)


def _post(url, body):
    data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.slow
def test_a_served_qa_run_answers_post_generate_and_refuses_bad_requests_with_a_reason(qa_run):
    from ray import serve

    from conftest import free_port
    from nikl_ray.serve import deploy

    run, _ = qa_run
    url = deploy(run.results, port=free_port())
    try:
        row = json.loads(Path(run.config.test).read_text().splitlines()[0])
        status, answer = _post(f"{url}/generate", {"question": row["question"]})
        assert status == 200 and answer["answer"] == _submitted(run.layout.submission(".jsonl"))[row["id"]]
        assert {c["member"] for c in answer["candidates"]} <= {"neox-full", "llama-prefix", "retrieval"}
        for body, code in [({"question": ""}, 400), ({}, 422), ({"question": "벽지?", "candidate": "nope"}, 400),
                           ({"question": "벽" * 2500}, 413), ([], 400), (b"not json", 422),
                           ({"question": "벽지?", "context": "문맥"}, 400)]:
            status, reason = _post(f"{url}/generate", body)
            assert status == code and reason.get("detail"), (body, status, reason)
        status, reason = _post(f"{url}/predict", {"text": "벽지"})
        assert status == 400 and "/generate" in reason["detail"]
        assert _post(f"{url}/generate", [{"question": row["question"]}])[0] == 200  # still serving
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_a_killed_qa_worker_restarts_from_its_checkpoint_and_ends_as_the_uninterrupted_run(qa_run, tmp_path):
    """The QA fold run of neox-full on fold 0, its Ray Train worker SIGKILLed after its first
    checkpoint: Ray Train restarts it from there and it ends with the fixture's (uninterrupted)
    run's best weights."""
    import ray
    from safetensors.numpy import load_file

    from conftest import kill_the_train_worker_after_its_first_checkpoint, resumed
    from nikl_ray.artifacts import load_manifest
    from nikl_ray.folds import fold_positions
    from nikl_ray.launcher import fit_run
    from nikl_ray.placement import Placement
    from nikl_ray.runfiles import read_history
    from nikl_ray.runspec import Device, fold_run, payload_of

    run, _ = qa_run
    exp, rows = run.exp, run.inputs.rows
    fold_run_ = fold_run(exp, exp.backbone("neox-full"), 0, fold_positions(rows, run.folds, 0), payload_of(rows),
                         Placement("neox-full", 0.1, 0, 0.0, 1.0), Device(False, "cpu"), name="qa-killed",
                         storage=str(tmp_path))
    pending = ray.remote(num_cpus=0)(fit_run).remote(fold_run_)
    kill_the_train_worker_after_its_first_checkpoint(tmp_path / "qa-killed")
    out = ray.get(pending)
    assert resumed(read_history(out["latest_checkpoint"])), "the restarted worker started over"
    ref = run.layout.pair("neox-full", 0)
    mine = load_file(str(Path(out["best_checkpoint"]) / "checkpoint" / "model.safetensors"))
    theirs = load_file(str(ref / load_manifest(ref)["best_checkpoint"] / "model.safetensors"))
    assert mine.keys() == theirs.keys()
    for k in mine:
        np.testing.assert_allclose(mine[k], theirs[k], atol=1e-5, err_msg=k)
    assert out["metrics"]["heldout_char_f1"] == pytest.approx(load_manifest(ref)["heldout_char_f1"], abs=1e-9)


@pytest.mark.slow
def test_a_qa_search_scores_its_trials_on_generated_answers_and_status_reads_the_run(qa_run):
    """Ray Tune + Optuna over the prefix backbone's default QA space (search_spaces/qa_prefix.yaml),
    each trial a QA Train run scored on the tuning fold's selection slice by the task's metric."""
    import csv

    import yaml

    import nikl_ray as nr
    from nikl_ray.status import run_status

    run, _ = qa_run
    best = nr.tune(run, "llama-prefix", num_samples=2, max_concurrent=2)
    board = list(csv.DictReader(open(run.layout.leaderboard("llama-prefix"))))
    assert len(board) == 2 and all(r["best selection score"] for r in board), board
    assert set(yaml.safe_load(best.read_text())) == {"prefix_tokens", "lr"}
    status = run_status(run.exp)
    assert status["stages"]["ensemble"] == "done" and status["stages"]["features"] == "done", status["stages"]
    assert set(status["features"]) == {f"{m}-fold{f}" for m in ("neox-full", "llama-prefix", "retrieval") for f in (0, 1)}
