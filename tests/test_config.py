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


def test_test_ids_that_collide_with_training_ids_stop_before_training(tmp_path):
    from conftest import nikl_row, write_jsonl
    from nikl_ray.pipeline import load_inputs

    test = write_jsonl(tmp_path / "test.jsonl", [nikl_row("demo-ea-train-000007"), nikl_row("fresh")])
    exp = load_experiment(_write(tmp_path, {"name": "a", "checkpoint": "tiny:electra"}, test=str(test)))
    with pytest.raises(ConfigError, match=r"test.jsonl: 1 test id\(s\) also appear in the training data.*demo-ea-train-000007"):
        load_inputs(exp)


@pytest.mark.parametrize("encoding", ["markers", "pair", "none"])
def test_target_encodings_handle_null_targets(tmp_path, encoding):
    from nikl_ray.backbones import MARKERS, load_tokenizer
    from nikl_ray.train import encode

    exp = load_experiment(_write(tmp_path, {"name": "a", "checkpoint": "tiny:gpt_neox", "target_encoding": encoding,
                                            "max_length": 12}))
    spec = exp.backbones[0]
    tok = load_tokenizer(spec)
    long_text = "너무 행복해 " * 20
    enc = encode(tok, spec, ["영화 너무 좋다", long_text], ["영화", None])
    assert all(len(ids) <= 12 for ids in enc["input_ids"])
    if encoding == "markers":
        t1, t2 = (tok.convert_tokens_to_ids(m) for m in MARKERS)
        for ids in enc["input_ids"]:  # truncation trims the text, never the marked target
            assert ids[-1] == t2 and t1 in ids
        assert enc["input_ids"][1][-2:] == [t1, t2]  # a null target is an empty marked span
    if encoding == "none":
        assert len(enc["input_ids"][0]) == len(tok("영화 너무 좋다")["input_ids"])
