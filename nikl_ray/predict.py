"""Labels for single sentences from a finished run: every fold model, the stacked heads, the chosen rule."""

from __future__ import annotations

import numpy as np

from nikl_ray.artifacts import load_manifest
from nikl_ray.config import Experiment
from nikl_ray.ensemble import decide, load_decision, make_head, stack_features
from nikl_ray.features import CLASSICAL, classical_predict, embed, feature_dir, load_trained
from nikl_ray.train import pair_dir


def predict_rows(exp: Experiment, texts: list[str], targets: list[str | None]) -> np.ndarray:
    """Stacked-ensemble probabilities (n, L) for raw rows, exactly as the test rows were scored."""
    import torch
    from safetensors.torch import load_file

    decision = load_decision(exp)
    task, k = exp.task, exp.folds.k
    heads_dir = exp.results / "ensemble" / "heads"
    norm = load_file(str(heads_dir / "standardize.safetensors"))
    mean, std = norm["mean"].numpy(), norm["std"].numpy()
    heads = []
    for h in decision["hidden_sizes"]:
        for j in range(decision["inner_folds"]):
            state = load_file(str(heads_dir / f"h{h}_inner{j}.safetensors"))
            head = make_head(len(mean), h, len(task.labels), exp.ensemble.dropout)
            head.load_state_dict(state)
            heads.append(head.eval())
    per_fold = []
    for fold in range(k):
        parts = []
        for member in decision["members"]:
            if member == CLASSICAL:
                parts.append((None, classical_predict(feature_dir(exp, member, fold), texts, targets, task.multi_label)))
                continue
            spec = exp.backbone(member)
            ckpt = pair_dir(exp, member, fold) / load_manifest(pair_dir(exp, member, fold))["best_checkpoint"]
            tokenizer, model = load_trained(spec, ckpt, len(task.labels), task.multi_label)
            parts.append(embed(spec, tokenizer, model, texts, targets, task.multi_label))
        x = torch.tensor((stack_features(parts, exp.ensemble.use_hidden) - mean) / std)
        with torch.no_grad():
            outs = [head(x) for head in heads]
        to_probs = torch.sigmoid if task.multi_label else (lambda z: torch.softmax(z, 1))
        per_fold.append(np.mean([to_probs(o).numpy() for o in outs], axis=0))
    return np.mean(per_fold, axis=0)


def predict_text(exp: Experiment, text: str, target: str | None = None) -> tuple[dict[str, float], list[str]]:
    """({label: probability}, chosen labels) for one sentence."""
    decision = load_decision(exp)
    probs = predict_rows(exp, [text], [target])
    chosen = decide(probs, decision["rule"], decision["params"], exp.task.multi_label)[0]
    return dict(zip(exp.task.labels, map(float, probs[0]))), [lab for lab, c in zip(exp.task.labels, chosen) if c]
