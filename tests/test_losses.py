"""The training losses under HF Trainer's gradient accumulation (real Trainer, a tiny real model, no Ray)."""

import numpy as np
import pytest
import torch

from conftest import DEMO_DIR
from nikl_ray.backbones import BackboneSpec, load_for_classification, load_tokenizer
from nikl_ray.data import read_rows
from nikl_ray.encode import to_dataset
from nikl_ray.tasks import get_task
from nikl_ray.worker import loss_function


def _one_step(spec, rows, labels, multi_label, batch_size, accumulation, loss, out_dir, soft=False):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    set_seed(0)
    tok = load_tokenizer(spec)
    model = load_for_classification(spec, labels.shape[1], multi_label, tok)
    for m in model.modules():  # one batch of 8 and two of 4 draw dropout masks differently
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    args = TrainingArguments(output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, learning_rate=1.0, optim="sgd", weight_decay=0.0,
                             max_grad_norm=0.0, lr_scheduler_type="constant", seed=0, data_seed=0, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=to_dataset(tok, spec, rows, labels, multi_label, soft),
            data_collator=DataCollatorWithPadding(tok), compute_loss_func=loss_function(loss, multi_label)).train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("loss, multi_label", [("asl", True), ("bce", True), ("ce", False)])
def test_accumulating_g_batches_of_b_gives_the_gradient_of_one_batch_of_b_times_g(tiny_backbones, tmp_path, loss, multi_label):
    rows = read_rows(DEMO_DIR / "train.jsonl", get_task("nikl-emotion")).take(range(8))
    labels = rows.labels if multi_label else np.eye(2, dtype=np.float32)[np.arange(8) % 2]
    spec = BackboneSpec(name="e", checkpoint=str(tiny_backbones["electra"]), max_length=24)
    one = _one_step(spec, rows.inputs(), labels, multi_label, 8, 1, loss, tmp_path / "a")
    accumulated = _one_step(spec, rows.inputs(), labels, multi_label, 4, 2, loss, tmp_path / "b")
    start = _one_step(spec, rows.inputs(), labels, multi_label, 8, 1, loss, tmp_path / "c")
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved == 0  # the same step twice is the same step
    from transformers import set_seed

    set_seed(0)
    init = dict(load_for_classification(spec, labels.shape[1], multi_label, load_tokenizer(spec)).named_parameters())
    assert max(float((one[k] - init[k].detach()).abs().max()) for k in one) > 1e-4  # the step did something
    for k in one:
        torch.testing.assert_close(accumulated[k], one[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_students_one_hot_soft_targets_step_as_hard_single_label_targets(tiny_backbones, tmp_path):
    """A single-label student learns probabilities (cross-entropy on soft targets, stages/distill.py):
    on one-hot targets, accumulated over two batches of 4, its step is the hard labels' one batch of 8."""
    rows = read_rows(DEMO_DIR / "train.jsonl", get_task("nikl-emotion")).take(range(8))
    labels = np.eye(2, dtype=np.float32)[np.arange(8) % 2]
    spec = BackboneSpec(name="e", checkpoint=str(tiny_backbones["electra"]), max_length=24)
    hard = _one_step(spec, rows.inputs(), labels, False, 8, 1, "ce", tmp_path / "a")
    soft = _one_step(spec, rows.inputs(), labels, False, 4, 2, "ce", tmp_path / "b", soft=True)
    for k in hard:
        torch.testing.assert_close(soft[k], hard[k], rtol=1e-4, atol=1e-6, msg=k)


def test_losses_are_means_over_label_entries():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = type("O", (), {"logits": logits})()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    assert loss_function("bce", True)(out, y) == pytest.approx(float(bce))
    assert loss_function("auto", True).kind == "bce" and loss_function("auto", False).kind == "ce"
    asl = loss_function("asl", True)
    assert 0 < float(asl(out, y)) < float(bce)  # easy negatives weigh less
    assert float(asl(out, y, num_items_in_batch=8)) == pytest.approx(float(asl(out, y)) / 2)
