"""Tuning modes beyond full fine-tuning and LoRA: prompt tuning on a tiny decoder (real Ray Train run)."""

import numpy as np
import pytest

from conftest import DEMO_DIR

pytestmark = pytest.mark.slow


def test_prompt_tuning_trains_its_virtual_tokens_and_head_only_and_its_fold_model_reads_rows(tiny_backbones, ray_local,
                                                                                             tmp_path):
    import ray

    from conftest import setup_run
    from nikl_ray.artifacts import read_json
    from nikl_ray.backbones import load_for_classification, load_tokenizer, load_trained
    from nikl_ray.folds import fold_positions
    from nikl_ray.launcher import fit_run
    from nikl_ray.members import embed
    from nikl_ray.placement import place
    from nikl_ray.runspec import Device, RowsPayload, fold_run
    from nikl_ray.runfiles import read_history

    exp, data = setup_run({"task": "nikl-emotion", "train": str(DEMO_DIR / "train.jsonl"), "results": str(tmp_path / "res"),
                           "folds": {"k": 2, "seed": 0}, "classical": False,
                           "backbones": [{"name": "prompt", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "prompt",
                                          "prompt_tokens": 8, "epochs": 4, "early_stopping_patience": 4, "lr": 5e-2,
                                          "batch_size": 16, "max_length": 40}]})
    spec = exp.backbones[0]
    model = load_for_classification(spec, 8, True, load_tokenizer(spec))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("prompt_encoder" in n or "score" in n for n in trainable), trainable
    device = Device(False, "cpu")
    placement = place("prompt", None, budget_gb=None, use_gpu=False)
    run = fold_run(exp, spec, 0, fold_positions(data.rows, data.folds(exp), 0), RowsPayload.of(data.rows), placement,
                   device, name="prompt-fold0", storage=str(tmp_path / "runs"))
    out = ray.get(ray.remote(num_cpus=0)(fit_run).remote(run))
    history = read_history(out["latest_checkpoint"])
    losses = [h["loss"] for h in history if "loss" in h and "eval_loss" not in h]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    tokenizer, trained = load_trained(spec, f"{out['best_checkpoint']}/checkpoint", 8, True)
    assert tokenizer.padding_side == "left"
    rows = data.rows.inputs().take(range(20))
    hidden, probs = embed(spec, tokenizer, trained, rows, True, batch_size=8)
    assert hidden.shape == (20, 64) and probs.shape == (20, 8) and np.isfinite(hidden).all()
    rev = list(reversed(range(20)))  # padding and order do not change what a row gets
    h2, p2 = embed(spec, tokenizer, trained, rows.take(rev), True, batch_size=8)
    np.testing.assert_allclose(p2[rev], probs, atol=1e-4)
    assert read_json(tmp_path / "runs" / "prompt-fold0" / "final.json")["heldout_micro_f1"] >= 0
