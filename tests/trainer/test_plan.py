"""`raygpt plan`: parameter counts equal the real model's, model-state memory equals DeepSpeed's own estimators, the
time and cost agree with published runs, and the command answers in one process without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import model_to_params as ds_model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from model.config import PRESETS, ModelConfig
from model.gpt import GPT
from model.hardware import GPUS
from tests.conftest import REPO
from trainer.plan import activations, buffers, count_params, model_states, throughput


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_counts_equal_the_model_built_on_the_meta_device(preset: str) -> None:
    for tied in (True, False):
        cfg = ModelConfig.preset(preset, tie_embeddings=tied)
        with torch.device("meta"):
            model = GPT(cfg)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        assert count_params(cfg) == (model.num_params(), largest)


@pytest.mark.parametrize("preset", ["debug", "tiny", "gpt2-124m"])
def test_model_states_equal_deepspeeds_estimators(preset: str) -> None:
    """DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs_all_live(model)` compute `model_to_params(model)` of a
    real model and pass it to these functions; their GPU figure must be ours, for every GPU count and offload."""
    cfg = ModelConfig.preset(preset)
    total, largest = ds_model_to_params(GPT(cfg))  # a real (CPU) model: DeepSpeed deduplicates by data_ptr
    assert (total, largest) == count_params(cfg)
    for nodes, per_node in [(1, 1), (1, 8), (4, 8), (16, 8)]:
        gpus = nodes * per_node
        for offload in (False, True):
            _, gpu = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=offload)
            ours = model_states(total, largest, 2, gpus, "optimizer" if offload else "none")
            assert sum(ours.values()) - ours["buffers"] == pytest.approx(gpu, abs=1)
        for offload, offload_params in [(False, False), (True, False), (True, True)]:
            _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, offload, offload_params)
            mode = "optimizer+params" if offload_params else "optimizer" if offload else "none"
            ours = model_states(total, largest, 3, gpus, mode)
            assert sum(ours.values()) - ours["buffers"] == pytest.approx(gpu, abs=1)
    # ZeRO-0/1 (no DeepSpeed estimator): 20Ψ whole; ZeRO-1 partitions only the 16Ψ of fp32 states
    assert sum(model_states(total, largest, 0, 8).values()) == 20 * total
    ours = model_states(total, largest, 1, 8)
    assert sum(ours.values()) - ours["buffers"] == pytest.approx(4 * total + 2 * total)


def test_buffers_are_deepspeeds_gradient_bucket_and_zero3s_live_parameters() -> None:
    """What the estimators leave out, with DeepSpeed's defaults and with the settings a config overrides: the whole
    bucket on a GPU, only its written pages on a CPU; ZeRO-3 keeps up to 1e9 gathered parameters."""
    small, big = 124_000_000, 7_000_000_000
    assert buffers(small, 0) == 0
    assert buffers(small, 1) == buffers(small, 2) == 2 * 5e8  # a GPU allocates the whole bucket
    assert buffers(small, 2, resident=True) == 2 * small  # a CPU holds the pages the gradients wrote
    assert buffers(small, 2, {"overlap_comm": True}) == 2 * 2 * 5e8
    assert buffers(small, 3) == 2 * 5e8 + 2 * small  # every parameter stays gathered
    assert buffers(big, 3) == 2 * 5e8 + 2 * 1e9  # up to stage3_max_live_parameters
    assert buffers(big, 3, {"reduce_bucket_size": 1e8, "stage3_max_live_parameters": 2e8}) == 2 * 1e8 + 2 * 2e8
    assert buffers(small, 2, {"contiguous_gradients": False}) == 0


def test_activations_follow_the_usual_estimate() -> None:
    cfg = ModelConfig.preset("gpt2-124m")
    per_layer = 34 * 1024 * 768  # Korthikanti et al. 2022, with flash attention (no 5·a·s/h score term), bytes
    full = activations(cfg, 1024, checkpointing=False)
    logits = 12 * 1024 * cfg.vocab_size
    assert 0.8 < (full - logits) / (12 * per_layer) < 1.25
    ckpt = activations(cfg, 1024, checkpointing=True)
    assert 0 < ckpt - logits < (full - logits) / 3  # layer inputs and one layer, instead of every layer


def test_time_and_cost_agree_with_published_runs() -> None:
    """GPT-2 124M: llm.c trained it on 10B tokens in about 90 minutes on 8×A100 80GB (≈60% MFU); the brief says
    "perhaps 24 hours". Llama 2 7B: 184,320 A100 GPU-hours for 2T tokens (its paper, table 2)."""
    gpt2 = ModelConfig.preset("gpt2-124m")
    a100 = GPUS["a100-80g"]
    minutes = 10e9 / throughput(gpt2, 8, a100, "bf16", 0.6, checkpointing=False) / 60
    assert 90 * 0.75 < minutes < 90 * 1.25
    default = 10e9 / throughput(gpt2, 8, a100, "bf16", 0.4, checkpointing=False) / 3600
    assert 1.5 < default < 24
    llama = ModelConfig.preset("llama-7b")
    gpu_hours = 2e12 / throughput(llama, 1, a100, "bf16", 0.4, checkpointing=False) / 3600
    assert abs(gpu_hours / 184_320 - 1) < 0.25


def test_raygpt_plan_answers_whether_llama_7b_trains_on_8_h100_with_zero_3() -> None:
    argv = [sys.executable, "-X", "importtime", "-m", "cluster.cli", "plan", "configs/cloud_gpu.yaml",
            "model.preset=llama-7b", "data.seq_len=4096", "data.tokenizer.vocab_size=32000", "train.zero_stage=3",
            "train.micro_batch_size=1",
            "--gpus", "8", "--gpu", "h100", "--tokens", "2e12"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "deepspeed" not in imported  # on paper: nothing heavy is loaded
    out = done.stdout
    assert "[plan] llama-7b: 6.738B parameters, context 4096" in out
    assert "| 3 ← | none |" in out and "the configured run (ZeRO-3, offload none, micro-batch 1" in out
    assert out.rstrip().endswith("fits")
    zero3 = next(line for line in out.splitlines() if line.startswith("| 3 ← |"))
    assert zero3.split("|")[8].strip() == "yes" and int(zero3.split("|")[9]) >= 1
    zero0 = next(line for line in out.splitlines() if line.startswith("| 0 |"))
    assert zero0.split("|")[8].strip() == "no"  # 20 bytes per parameter do not fit one H100
    bad = subprocess.run([sys.executable, "-m", "cluster.cli", "plan", "configs/cloud_gpu.yaml", "--gpu", "b200"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("raygpt: error: --gpu 'b200': unknown GPU (known: h200")
