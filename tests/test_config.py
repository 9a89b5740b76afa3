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
    ({"name": "a", "checkpoint": "tiny:electra", "loss": "ce"}, {}, r"loss ce is for single-label tasks"),
    ({"name": "a", "checkpoint": "tiny:electra", "loss": "asl"}, {"task": "sentence-sentiment",
                                                                  "train": str(DEMO_DIR.parent.parent / "README.md")},
     r"loss asl is for multi-label tasks"),
    ({"name": "a", "checkpoint": "tiny:electra"}, {"classical": ["tfidf-lr", "svm"]}, r"classical"),
    ({"name": "nbsvm", "checkpoint": "tiny:electra"}, {"classical": ["nbsvm"]}, r"no backbone of the same name"),
    ({"name": "a", "checkpoint": "tiny:gpt_neox"}, {"task": "hansol-qa", "classical": ["nbsvm"]},
     r"a generate task's classical member is retrieval"),
])
def test_bad_experiment_files_fail_with_the_key_path(tmp_path, backbone, top, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(_write(tmp_path, backbone, **top))
    assert not (tmp_path / "res").exists()  # nothing was built or written


def test_a_run_opened_once_reopens_from_its_results_root_alone(tmp_path):
    """`--results DIR` without `--config` (distill, pipeline, status…): the experiment as opened, the keys
    its backbones set themselves kept (tuned values override those loudly)."""
    from nikl_ray import open_run
    from nikl_ray.config import ConfigError

    path = _write(tmp_path, {"name": "a", "checkpoint": "tiny:llama", "mode": "lora", "lora_r": 4}, defaults={"epochs": 7})
    written, opened = load_experiment(path), open_run(path)
    (tmp_path / "exp.yaml").unlink()  # the results root alone
    again = open_run(None, tmp_path / "res", build=False).config
    assert again == written and again.pinned == {"a": ["lora_r", "mode"]}
    assert open_run(None, tmp_path / "res").exp.backbones[0].checkpoint == opened.exp.backbones[0].checkpoint
    with pytest.raises(ConfigError, match="experiment.json is missing"):
        open_run(None, tmp_path / "elsewhere", build=False)


def test_reading_builds_nothing_and_opening_the_run_builds_tiny_backbones_once(tmp_path):
    from nikl_ray import open_run

    path = _write(tmp_path, {"name": "a", "checkpoint": "tiny:llama", "mode": "lora"}, defaults={"epochs": 7, "lr": 1e-3})
    exp = load_experiment(path)
    assert not (tmp_path / "res").exists()
    spec = exp.backbones[0]
    assert spec.epochs == 7 and spec.family == "decoder" and spec.resolved_lora_targets() == ["q_proj", "k_proj", "v_proj", "o_proj"]
    built = open_run(exp).exp.backbones[0].checkpoint
    assert built == str(tmp_path / "res" / "tiny_backbones" / "llama") and (tmp_path / "res" / "tiny_backbones" / "llama" / "config.json").exists()
    stamp = (tmp_path / "res" / "tiny_backbones" / "llama" / "config.json").stat().st_mtime_ns
    open_run(path)
    assert (tmp_path / "res" / "tiny_backbones" / "llama" / "config.json").stat().st_mtime_ns == stamp


def test_validate_writes_nothing(tmp_path):
    import subprocess
    import sys

    path = _write(tmp_path, {"name": "a", "checkpoint": "tiny:electra"})
    out = subprocess.run([sys.executable, "-m", "nikl_ray.cli", "validate", "--config", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "ok: 400 labelled rows" in out.stdout, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


def test_tuned_values_win_over_pinned_ones_and_say_so(tmp_path, caplog):
    from nikl_ray.run import apply_tuned

    exp = load_experiment(_write(tmp_path, {"name": "a", "checkpoint": "tiny:gpt_neox", "mode": "lora", "lr": 1e-3},
                                 defaults={"lora_r": 4}))
    best = exp.layout.best_config("a")
    best.parent.mkdir(parents=True)
    best.write_text("lora_r: 32\nlr: 0.004\n")
    with caplog.at_level("WARNING", logger="nikl_ray"):
        spec = apply_tuned(exp).backbones[0]
    assert (spec.lora_r, spec.lr) == (32, 0.004)
    assert "pins lr=0.001" in caplog.text and "tuned value wins" in caplog.text
    assert "lora_r" not in caplog.text  # set by defaults, not pinned by the backbone: no warning


def test_lora_alpha_follows_the_rank_unless_given():
    from nikl_ray.backbones import BackboneSpec

    spec = lambda **kw: BackboneSpec(name="a", checkpoint="tiny:gpt_neox", mode="lora", **kw)  # noqa: E731
    assert spec(lora_r=8).alpha == 16 and spec(lora_r=64).alpha == 128  # the scale alpha / r stays 2
    assert spec(lora_r=8, lora_alpha_ratio=1.0).alpha == 8
    assert spec(lora_r=64, lora_alpha=16).alpha == 16


def test_test_ids_that_collide_with_training_ids_stop_before_training(tmp_path):
    from conftest import nikl_row, write_jsonl
    from nikl_ray.inputs import load_inputs

    test = write_jsonl(tmp_path / "test.jsonl", [nikl_row("demo-ea-train-000007"), nikl_row("fresh")])
    exp = load_experiment(_write(tmp_path, {"name": "a", "checkpoint": "tiny:electra"}, test=str(test)))
    with pytest.raises(ConfigError, match=r"test.jsonl: 1 test id\(s\) also appear in the training data.*demo-ea-train-000007"):
        load_inputs(exp)


@pytest.mark.parametrize("encoding", ["inline", "markers", "pair", "none"])
def test_target_encodings_handle_null_targets(tmp_path, encoding):
    from nikl_ray.backbones import MARKERS, load_tokenizer
    from nikl_ray import open_run
    from nikl_ray.data import TextRows
    from nikl_ray.encode import encode

    exp = open_run(_write(tmp_path, {"name": "a", "checkpoint": "tiny:gpt_neox", "target_encoding": encoding,
                                     "max_length": 12})).exp
    spec = exp.backbones[0]
    tok = load_tokenizer(spec)
    long_text = "너무 행복해 " * 20
    enc = encode(tok, spec, TextRows(["영화 너무 좋다", long_text], ["영화", None], [(0, 2), None]))
    assert all(len(ids) <= 12 for ids in enc["input_ids"])
    t1, t2 = (tok.convert_tokens_to_ids(m) for m in MARKERS)
    if encoding == "markers":
        for ids in enc["input_ids"]:  # truncation trims the text, never the marked target
            assert ids[-1] == t2 and t1 in ids
        assert enc["input_ids"][1][-2:] == [t1, t2]  # a null target is an empty marked span
    if encoding == "inline":
        assert enc["input_ids"][1][:2] == [t1, t2]  # a null target: an empty marked span at the start
    if encoding == "none":
        assert len(enc["input_ids"][0]) == len(tok("영화 너무 좋다")["input_ids"])


def test_inline_markers_surround_the_occurrence_the_span_names(tmp_path):
    """The same target twice in a text: inline encoding marks the one at [begin:end]; markers cannot tell."""
    from nikl_ray.backbones import MARKERS, load_tokenizer
    from nikl_ray import open_run
    from nikl_ray.data import TextRows
    from nikl_ray.encode import encode

    exp = open_run(_write(tmp_path, {"name": "a", "checkpoint": "tiny:electra", "target_encoding": "inline",
                                     "max_length": 16})).exp
    spec = exp.backbones[0]
    tok = load_tokenizer(spec)
    text = "영화 좋다 그런데 영화 싫다"
    first, second = (0, 2), (text.rindex("영화"), text.rindex("영화") + 2)
    a, b = (tok.convert_ids_to_tokens(encode(tok, spec, TextRows([text], ["영화"], [s]))["input_ids"][0]) for s in (first, second))
    assert a != b
    assert a.index(MARKERS[0]) == 1 and b.index(MARKERS[0]) > 3  # right after [CLS]; after the first clause
    long = "아주 " * 40 + text  # too long: the window keeps the marked span
    tokens = tok.convert_ids_to_tokens(encode(tok, spec, TextRows([long], ["영화"], [(40 * 3 + second[0], 40 * 3 + second[1])]))["input_ids"][0])
    assert len(tokens) <= 16 and MARKERS[0] in tokens and MARKERS[1] in tokens
