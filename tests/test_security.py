"""Safe defaults: no pickle, no remote code unless asked, dashboard on loopback, no secrets written."""

import re
from pathlib import Path

import pytest

from nikl_ray.backbones import BackboneSpec

SOURCES = sorted((Path(__file__).resolve().parents[1] / "nikl_ray").rglob("*.py"))


def test_no_pickle_and_no_unsafe_torch_load_in_the_package():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"\bimport pickle\b|\bpickle\.load|joblib\.load", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "allow_pickle=True" not in text, path


def test_remote_code_is_off_unless_a_backbone_opts_in(tiny_backbones):
    spec = BackboneSpec(name="x", checkpoint=str(tiny_backbones["electra"]))
    assert spec.trust_remote_code is False
    for path in SOURCES:
        assert "trust_remote_code=True" not in path.read_text(), path


@pytest.mark.slow
def test_a_local_ray_instance_serves_its_dashboard_on_loopback_only(ray_local):
    from nikl_ray.ray_private import dashboard_url

    url = dashboard_url()
    assert url.startswith("127.0.0.1:"), url


@pytest.mark.slow
def test_hub_tokens_never_reach_manifests(trained):
    exp = trained[0]
    for manifest in exp.results.rglob("manifest.json"):
        assert not re.search(r"hf_[A-Za-z0-9]{20,}|HF_TOKEN|HUGGING_FACE_HUB_TOKEN", manifest.read_text()), manifest
