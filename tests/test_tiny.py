import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


@pytest.mark.parametrize("kind", ["electra", "roberta", "gpt_neox", "llama"])
def test_each_tiny_backbone_loads_and_runs_a_forward_pass_with_8_labels(tiny_backbones, kind):
    path = tiny_backbones[kind]
    assert (path / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=8)
    batch = tok(["오늘 영화 너무 좋다", "무서워"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 8) and torch.isfinite(logits).all()
    # the tokenizer was trained on the task text: common Korean words are not unknown
    assert tok.unk_token_id not in tok("너무 좋다")["input_ids"]
