import pytest
import yaml

from conftest import DEMO_DIR
from nikl_ray.config import ConfigError, load_experiment


def _write(tmp_path, backbone: dict, **top):
    cfg = {"task": "nikl-emotion", "train": str(DEMO_DIR / "train.jsonl"), "results": str(tmp_path / "res"),
           "backbones": [backbone], **top}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


@pytest.mark.parametrize("backbone, top, message", [
    ({"name": "a", "checkpoint": "tiny:electra", "lr_rate": 1e-3}, {}, r"backbones.0.lr_rate: unknown key"),
    ({"name": "a", "checkpoint": "tiny:gpt_neox", "mode": "lora", "lora_r": 0}, {}, r"backbones.0.lora_r: .*greater than or equal to 1"),
    ({"name": "a", "checkpoint": "tiny:electra", "lr": -1e-3}, {}, r"backbones.0.lr: .*greater than 0"),
    ({"name": "a", "checkpoint": "tiny:electra", "family": "transformer"}, {}, r"backbones.0.family: .*'encoder' or 'decoder'"),
    ({"name": "a", "checkpoint": "/no/such/checkpoint"}, {}, r"backbones.0.checkpoint: .*no config.json"),
    ({"name": "a", "checkpoint": "tiny:electra", "mode": "qlora4"}, {}, r"backbones.0.mode"),
    ({"name": "a", "checkpoint": "tiny:electra"}, {"folds": {"k": 1}}, r"folds.k: .*greater than or equal to 2"),
    ({"name": "a", "checkpoint": "tiny:electra"}, {"tasks": "x"}, r"tasks: unknown key"),
])
def test_bad_experiment_files_fail_with_the_key_path(tmp_path, backbone, top, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(_write(tmp_path, backbone, **top))
    assert not (tmp_path / "res").exists()  # nothing was built or written


def test_defaults_apply_and_tiny_backbones_are_built_once(tmp_path):
    path = _write(tmp_path, {"name": "a", "checkpoint": "tiny:llama", "mode": "lora"}, defaults={"epochs": 7, "lr": 1e-3})
    exp = load_experiment(path)
    spec = exp.backbones[0]
    assert spec.epochs == 7 and spec.family == "decoder" and spec.resolved_lora_targets() == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (tmp_path / "res" / "tiny_backbones" / "llama" / "config.json").exists()
