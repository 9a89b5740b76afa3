import pytest

from nikl_ray.placement import GiB, ModelShape, estimate_memory_bytes, format_plan, lora_params, place

# polyglot-ko-1.3b and a BERT-base-sized Korean encoder (KLUE-RoBERTa-base, KoELECTRA-base)
NEOX_1_3B = ModelShape(params=1.33e9, hidden=2048, layers=24, heads=16, intermediate=8192, vocab=30080)
ENCODER_110M = ModelShape(params=110e6, hidden=768, layers=12, heads=12, intermediate=3072, vocab=32000)
NEOX_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def test_lora_parameter_count_for_polyglot_1_3b_rank_64():
    # per layer: 64·(2048+6144) + 64·(2048+2048) + 64·(2048+8192)·2 = 2,097,152; × 24 layers
    assert lora_params(NEOX_1_3B, NEOX_TARGETS, 64) == 24 * 2_097_152


def test_qlora_1_3b_estimate_and_at_least_three_per_24gb_card():
    est = estimate_memory_bytes(NEOX_1_3B, mode="qlora", batch_size=8, max_length=128, lora_r=64,
                                lora_targets=NEOX_TARGETS, gradient_checkpointing=True)
    # 4-bit body ≈ 0.68 GB, 16-bit embeddings ≈ 0.12 GB, LoRA r=64 (50M) × 16 B ≈ 0.8 GB, 1 GiB context
    assert 2.5 * GiB < est < 4.5 * GiB
    p = place("polyglot-1.3b-qlora", est, card_gb=24, use_gpu=True)
    assert p.trials_per_card >= 3 and p.gpu_share == pytest.approx(1 / p.trials_per_card)


def test_full_110m_encoder_estimate():
    est = estimate_memory_bytes(ENCODER_110M, mode="full", batch_size=32, max_length=128)
    # 110M × 16 B = 1.64 GiB of weights+grads+Adam; activations 12 · 128·32·768 · (34 + 5·12·128/768) ≈ 1.6 GiB
    assert 4.0 * GiB < est < 5.5 * GiB
    assert place("klue-roberta-base", est, card_gb=24, use_gpu=True).trials_per_card == 4


def test_full_fine_tuning_1_3b_costs_far_more_than_qlora_and_does_not_fit_small_cards():
    full = estimate_memory_bytes(NEOX_1_3B, mode="full", batch_size=8, max_length=128, gradient_checkpointing=True)
    qlora = estimate_memory_bytes(NEOX_1_3B, mode="qlora", batch_size=8, max_length=128, lora_r=64,
                                  lora_targets=NEOX_TARGETS, gradient_checkpointing=True)
    assert full > 5 * qlora
    with pytest.raises(ValueError, match="does not fit"):
        place("neox-full", full, card_gb=16, use_gpu=True)


def test_shares_are_always_one_over_k_and_cpu_plans_use_cpus():
    for gb in (0.5, 3, 7, 11, 23):
        p = place("x", gb * GiB, card_gb=24, use_gpu=True)
        assert abs(1 / p.gpu_share - round(1 / p.gpu_share)) < 1e-9
    cpu = place("x", 3 * GiB, use_gpu=False, cpus=1)
    assert cpu.resources() == {"CPU": 1} and "2 at once" in format_plan([cpu], card_gb=24, total_cpus=2, total_gpus=0)


def test_the_shipped_24gb_example_packs_at_least_three_qlora_1_3b_trials_per_card(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "nikl_ray" / "examples" / "gpu_24gb.yaml"
    out = subprocess.run([sys.executable, "-m", "nikl_ray.cli", "plan", "--config", str(example), "--gpus", "1",
                          "--results", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if "polyglot-ko-1.3b" in l)
    per_card = int(line.split("→")[1].split("trial")[0])
    assert per_card >= 3, out.stdout
