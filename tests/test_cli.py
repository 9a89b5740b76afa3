import subprocess
import sys

from conftest import nikl_row, write_jsonl


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nikl_ray.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_subcommands():
    out = _cli("--help")
    assert out.returncode == 0
    for cmd in ("split", "train", "tune", "features", "ensemble", "predict", "pipeline", "demo", "make-backbones", "status"):
        assert cmd in out.stdout


def test_help_and_version_answer_before_anything_heavy_is_imported():
    code = ("import sys\nfrom nikl_ray.cli import main\n"
            "for argv in (['--help'], ['--version'], ['train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('ray', 'torch', 'transformers', 'pydantic', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("[]"), out.stdout + out.stderr
    assert "nikl-ray 0.2.0" in out.stdout and "Train every fold × backbone as Ray Train runs." in out.stdout


def test_commands_without_ray_take_no_ray_flags():
    for cmd in ("validate", "split", "status", "plan"):
        assert "--local" not in _cli(cmd, "--help").stdout, cmd


def test_bad_input_exits_non_zero_with_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [nikl_row("a"), '{"id": "b",', nikl_row("c", target=("영화", 0, 2))])
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"task: nikl-emotion\ntrain: {data}\nbackbones: [{{name: a, checkpoint: 'tiny:electra'}}]\n")
    out = _cli("validate", "--config", str(cfg), "--results", str(tmp_path / "res"))
    assert out.returncode == 2
    assert f"{data}:2: malformed JSON" in out.stderr and f"{data}:3: target span" in out.stderr
