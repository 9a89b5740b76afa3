import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may need a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NIKL_DIR = SHARED / "nikl_ea_2023"
NSMC_DIR = SHARED / "nsmc_like"
DEMO_DIR = Path(__file__).resolve().parents[1] / "nikl_ray" / "demo_data"


def nikl_row(rid="r1", text="오늘 영화 너무 좋다", target=("영화", 3, 5), labels=("joy",)):
    from nikl_ray.tasks import NIKL_EMOTIONS

    form, begin, end = target if target else (None, None, None)
    return {"id": rid, "input": {"form": text, "target": {"form": form, "begin": begin, "end": end}},
            "output": {e: str(e in labels) for e in NIKL_EMOTIONS}}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory):
    """Tiny ELECTRA, RoBERTa, GPT-NeoX and Llama checkpoints built from the demo text, once per session."""
    from nikl_ray.data import read_rows
    from nikl_ray.tasks import get_task
    from nikl_ray.tiny import make_tiny_backbones

    rows = read_rows(DEMO_DIR / "train.jsonl", get_task("nikl-emotion"))
    return make_tiny_backbones(rows.texts, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance (2 CPUs, no dashboard) shared by the tests that need Ray."""
    import ray

    from nikl_ray.cluster import connect

    connect(local=True, num_cpus=2, dashboard=False)
    yield
    ray.shutdown()
