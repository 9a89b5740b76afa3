from pathlib import Path

import pytest

from nikl_ray.placement import (CONTEXT_GB, GiB, ModelShape, PlacementError, concurrent_slots, estimate_memory_bytes,
                                format_plan, lora_params, place, slots_for)

# polyglot-ko-1.3b and a BERT-base-sized Korean encoder (KLUE-RoBERTa-base, KoELECTRA-base)
NEOX_1_3B = ModelShape(params=1.33e9, hidden=2048, layers=24, heads=16, intermediate=8192, vocab=30080)
ENCODER_110M = ModelShape(params=110e6, hidden=768, layers=12, heads=12, intermediate=3072, vocab=32000)
NEOX_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
EXAMPLE = Path(__file__).resolve().parents[1] / "nikl_ray" / "examples" / "gpu_24gb.yaml"


def test_lora_parameter_count_for_polyglot_1_3b_rank_64():
    # per layer: 64·(2048+6144) + 64·(2048+2048) + 64·(2048+8192)·2 = 2,097,152; × 24 layers
    assert lora_params(NEOX_1_3B, NEOX_TARGETS, 64) == 24 * 2_097_152


def test_estimates_sit_just_above_what_an_h200_measured():
    """Measured on an H200 (torch peak allocated, a `nikl-ray pipeline --local` run; benchmarks/gpu_packing.py
    saw 1.90 and 2.40 GB, benchmarks/README.md): 1.90 GB for the 1.3B QLoRA r=64 trial at 8 × 128, 2.58 GB
    for the 110M encoder in full fine-tuning at 32 × 128. The estimate may exceed them, by at most 40%."""
    qlora = estimate_memory_bytes(NEOX_1_3B, mode="qlora", batch_size=8, max_length=128, lora_r=64,
                                  lora_targets=NEOX_TARGETS, gradient_checkpointing=True) / GiB
    full = estimate_memory_bytes(ENCODER_110M, mode="full", batch_size=32, max_length=128) / GiB
    assert 1.90 < qlora < 1.90 * 1.4 and 2.58 < full < 2.58 * 1.4, (qlora, full)


def test_a_qlora_1_3b_rank_64_trial_packs_at_least_three_per_24gb_card_with_its_context():
    est = estimate_memory_bytes(NEOX_1_3B, mode="qlora", batch_size=8, max_length=128, lora_r=64,
                                lora_targets=NEOX_TARGETS, gradient_checkpointing=True)
    p = place("polyglot-1.3b-qlora", est, budget_gb=24, use_gpu=True)
    assert p.trials_per_card >= 3 and p.gpu_share == pytest.approx(1 / p.trials_per_card)
    assert p.trials_per_card * p.per_trial_gb <= 24  # context included, every trial fits


def test_the_cap_keeps_a_24gb_plan_inside_24gb_on_a_bigger_card():
    est = 3 * GiB
    on_80 = place("x", est, budget_gb=24, physical_gb=80, use_gpu=True)
    on_24 = place("x", est, budget_gb=24, physical_gb=24, use_gpu=True)
    assert on_80.trials_per_card == on_24.trials_per_card
    # what a trial may allocate, plus its context, is its share of the 24 GB budget on either card
    for p, physical in ((on_80, 80), (on_24, 24)):
        assert p.memory_fraction * physical + CONTEXT_GB == pytest.approx(24 / p.trials_per_card)
    assert on_80.memory_fraction < on_24.memory_fraction


def test_a_trial_that_fits_no_card_is_refused_naming_the_card_found():
    full = estimate_memory_bytes(NEOX_1_3B, mode="full", batch_size=8, max_length=128, gradient_checkpointing=True)
    with pytest.raises(PlacementError, match=r"does not fit a 16 GB card budget; the card found has 15.8 GB"):
        place("neox-full", full, budget_gb=16, physical_gb=15.8, use_gpu=True)


def test_shares_are_always_one_over_k_and_cpu_plans_use_cpus():
    for gb in (0.5, 3, 7, 11, 20):
        p = place("x", gb * GiB, budget_gb=24, use_gpu=True)
        assert abs(1 / p.gpu_share - round(1 / p.gpu_share)) < 1e-9
    cpu = place("x", 3 * GiB, budget_gb=None, use_gpu=False, cpus=1)
    assert cpu.resources() == {"CPU": 1} and cpu.estimate_gb is None  # nothing on a CPU reads it
    assert "2 at once" in format_plan([cpu], budget_gb=None, physical_gb=None, total_cpus=2, total_gpus=0)


def test_slots_are_per_backbone_and_submission_follows_the_roomiest():
    a = place("a", 3 * GiB, budget_gb=24, use_gpu=True, cpus=1)  # 5 per card
    b = place("b", 10 * GiB, budget_gb=24, use_gpu=True, cpus=1)  # 2 per card
    assert (a.trials_per_card, b.trials_per_card) == (5, 2)
    assert concurrent_slots([a, b], cpus=16, gpus=2) == 10
    assert concurrent_slots([b], cpus=16, gpus=2) == 4
    assert concurrent_slots([a, b], cpus=3, gpus=2) == 3
    # the launcher counts each run as 1/slots of the cluster: 4 b's fill it, as do 10 a's
    assert (slots_for(a, cpus=16, gpus=2), slots_for(b, cpus=16, gpus=2)) == (10, 4)
    cpu = place("c", 3 * GiB, budget_gb=None, use_gpu=False, cpus=2)
    assert concurrent_slots([cpu], cpus=5, gpus=0) == 2


def test_the_shipped_24gb_plan_prints_caps_and_the_context_and_packs_the_search_corner(tmp_path, cli):
    code, out, err = cli("plan", "--config", EXAMPLE, "--gpus", "1", "--results", tmp_path)
    assert code == 0, err
    assert f"{CONTEXT_GB:g} GB CUDA context reserved per process" in out
    lines = {line.split("~")[0].strip(): line for line in out.splitlines() if "→" in line}
    search = lines["polyglot-ko-1.3b (search)"]  # lora_r up to the space's 128
    assert int(search.split("→")[1].split("trial")[0]) >= 3 and "allocator cap" in search and "context" in search, out
    assert set(lines) == {"klue-roberta-base", "polyglot-ko-1.3b", "polyglot-ko-1.3b (search)"}


def test_plan_on_a_cpu_machine_describes_cpu_mode(tmp_path, cli):
    code, out, err = cli("plan", "--config", EXAMPLE, "--cpus", "4", "--results", tmp_path)
    assert code == 0, err
    assert "CPU mode: 4 CPUs, no GPU" in out and "GPU share" not in out
