"""The planner reproduces the published worked examples."""

from trainer.planner import (Architecture, compute_optimal_tokens, memory_per_gpu, minicpm_batch_tokens, training_days,
                             training_flops)

LLAMA_7B = Architecture(vocab=32000, layers=32, hidden=4096, ffn=11008)
LLAMA_65B = Architecture(vocab=32000, layers=80, hidden=8192, ffn=22016)


def test_llama_7b_parameter_count():
    assert LLAMA_7B.parameters() == 6_738_415_616


def test_llama_65b_on_1_4t_tokens_takes_about_20_6_days_on_2048_gpus():
    flops = training_flops(LLAMA_65B.parameters(), 1.4e12, recompute=True)  # 8·N·D
    assert round(training_days(flops, 2048, 2e14), 1) in (20.6, 20.7)
    assert abs(training_days(training_flops(65e9, 1.4e12, recompute=True), 2048, 2e14) - 20.6) < 0.05


def test_gqa_tied_memory_and_laws():
    mha = Architecture(32000, 2, 512, 1376, heads=8)
    gqa = Architecture(32000, 2, 512, 1376, heads=8, kv_heads=2)
    assert mha.parameters() - gqa.parameters() == 2 * 2 * 512 * (512 - 128)
    assert Architecture(32000, 2, 512, 1376, tied=True).parameters() == mha.parameters() - 32000 * 512
    mem = memory_per_gpu(1e9, 8)
    assert mem["bf16 mixed"] == 16e9 and mem["ZeRO-3"] == 2e9 and mem["ZeRO-1"] > mem["ZeRO-2"] > mem["ZeRO-3"]
    assert abs(minicpm_batch_tokens(2.0) - 1.2110e9 / 2.0**6.2393) < 1e-6
    assert minicpm_batch_tokens(2.0) > minicpm_batch_tokens(3.0)  # lower loss, bigger batch
    assert abs(compute_optimal_tokens(1e24) - 0.299 * 1e24**0.537) / compute_optimal_tokens(1e24) < 1e-12
