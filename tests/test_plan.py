"""spin-plan and the memory model: parameter counts against the real Megatron model, the formulas' behaviour, the
fit check and its cheapest fix, the command line, and the estimate against the measured peak memory of tiny CPU
training steps (each within ±25%)."""

import gc
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open

from spin_megatron.errors import ConfigError
from spin_megatron.plan import builtin_arch, format_plan, main, resolve_arch, training_world_size
from spin_megatron.planning.counting import GB, full_model_params, stage_params
from spin_megatron.planning.fit import _with, check_fits, check_training_memory
from spin_megatron.planning.memory import estimate
from spin_megatron.train import load_config
from tests.helpers import REPO

PRESET = ["experiment=qwen2.5_3b_gsm8k"]
NO_ROLLOUT = ["rollout.engine=replay", "rollout.replay_path=unused.jsonl", "trainer.test_freq=0"]


def _plan(arch_name, *overrides, world_size=8):
    cfg = load_config([*PRESET, *overrides])
    return estimate(cfg, builtin_arch(arch_name), world_size=world_size), cfg


def _fix_message(arch_name, *overrides, world_size=8):
    plan, cfg = _plan(arch_name, *overrides, world_size=world_size)
    with pytest.raises(ConfigError) as info:
        check_fits(plan, cfg)
    return str(info.value)


# ------------------------------------------------------------------------------------------ parameter counts
def _megatron_counts(model, arch, tp, pp):
    """Per pipeline stage, one TP rank's parameters, derived from a TP1/PP1 model's named parameters."""
    per_stage, layers = [0] * pp, arch.num_layers // pp
    for name, param in model.named_parameters():
        n = param.numel() // tp if getattr(param, "tensor_model_parallel", False) else param.numel()
        if name.startswith("embedding."):
            per_stage[0] += n
            if (
                arch.tie_word_embeddings and pp > 1
            ):  # a copy on the last stage (setup_embeddings_and_output_layer)
                per_stage[-1] += n
        elif name.startswith("decoder.layers."):
            per_stage[int(name.split(".")[2]) // layers] += n
        else:  # final norm, output layer
            per_stage[-1] += n
    return per_stage


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama", "tiny_qwen3", "tiny_qwen3_moe_mixed"])
def test_parameter_counts_equal_the_megatron_model(fixture, request):
    from spin_megatron.models import build_gpt_model, load_arch
    from spin_megatron.parallel import init_parallel

    hf_dir = request.getfixturevalue(fixture)
    arch = load_arch(hf_dir)
    model = build_gpt_model(arch, init_parallel(1, 1))
    assert sum(p.numel() for p in model.parameters()) == stage_params(
        arch, 1, 1, 0, arch.padded_vocab_size(1)
    )
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        expected = [stage_params(arch, tp, pp, s, arch.padded_vocab_size(tp)) for s in range(pp)]
        assert _megatron_counts(model, arch, tp, pp) == expected, (tp, pp)
    with safe_open(hf_dir / "model.safetensors", "pt") as f:
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) == full_model_params(arch)


def test_builtin_shapes_have_the_published_sizes():
    published = {"qwen2.5-0.5b": 0.494, "qwen2.5-3b": 3.086, "qwen2.5-7b": 7.616, "qwen2.5-32b": 32.76}
    published["llama3.1-8b"] = 8.030
    published |= {"qwen3-8b": 8.19, "qwen3-30b-a3b": 30.53, "qwen3-235b-a22b": 235.09}  # Qwen3's model cards
    for name, billions in published.items():
        assert full_model_params(builtin_arch(name)) / 1e9 == pytest.approx(billions, rel=3e-3), name


# ------------------------------------------------------------------------------------------ formulas
def test_experts_are_divided_by_ep_and_their_optimizer_state_by_the_expert_data_parallel_ranks():
    from spin_megatron.planning.counting import active_params, stage_param_split

    arch = builtin_arch("qwen3-30b-a3b")
    assert active_params(arch) / 1e9 == pytest.approx(3.35, rel=1e-2)  # "A3B"
    dense, experts = stage_param_split(arch, 1, 1, 0, arch.padded_vocab_size(1), ep=8, etp=1)
    assert experts == 48 * 16 * 3 * 2048 * 768  # 16 of 128 experts in each of the 48 layers
    moe = ["model.hf_path=Qwen/Qwen3-30B-A3B", "parallel.tp=1", "parallel.activation_recompute=true"]
    ep8, _ = _plan("qwen3-30b-a3b", *moe, "parallel.ep=8", world_size=16)  # expert-DP 2
    ep16, _ = _plan("qwen3-30b-a3b", *moe, "parallel.ep=16", world_size=16)  # expert-DP 1
    assert ep8.stage.num_params - ep16.stage.num_params == experts // 2
    dense_moments = 8 * dense // 16
    assert ep8.stage.optimizer_moments == dense_moments + 8 * experts // 2
    assert ep16.stage.optimizer_moments == dense_moments + 8 * (experts // 2)  # half the experts, unsharded
    # the weight sync sends every expert; the dispatch sends a token's 8 copies (EP−1)/EP of the time, both ways
    assert ep8.sync_bytes_per_engine == 2 * full_model_params(arch)
    assert ep16.dispatch_bytes_per_step / ep8.dispatch_bytes_per_step == pytest.approx(
        (15 / 16) / (7 / 8), rel=1e-3
    )


def test_distributed_optimizer_divides_the_optimizer_state_over_data_parallel_ranks():
    sharded, _ = _plan("qwen2.5-3b")  # TP2 × DP4
    full, _ = _plan("qwen2.5-3b", "optim.use_distributed_optimizer=false")
    assert sharded.dp == 4
    assert full.stage.optimizer_moments == pytest.approx(4 * sharded.stage.optimizer_moments, abs=8)
    assert full.stage.optimizer_main == pytest.approx(4 * sharded.stage.optimizer_main, abs=8)
    assert full.stage.grads == sharded.stage.grads == 4 * sharded.stage.num_params
    assert (
        sharded.stage.optimizer_main + sharded.stage.optimizer_moments == 12 * sharded.stage.num_params // 4
    )
    fp32, _ = _plan("qwen2.5-3b", "model.dtype=fp32")
    assert fp32.stage.optimizer_main == 0  # fp32 parameters are their own main copy


def test_context_parallel_splits_a_gpus_tokens_and_shards_the_optimizer_over_dp_times_cp():
    from spin_megatron.planning.counting import cp_rank_tokens

    plain, _ = _plan("qwen2.5-3b", "parallel.tp=2", world_size=2)  # TP2 × DP1
    split, cfg = _plan("qwen2.5-3b", "parallel.tp=2", "parallel.cp=2", world_size=4)  # TP2 × CP2 × DP1
    assert split.dp == plain.dp == 1 and split.cp == 2 and plain.cp == 1
    tokens, arch, e = plain.micro_batch_tokens, plain.arch, 2  # bf16
    assert (
        cp_rank_tokens(tokens, 2) == tokens // 2 and cp_rank_tokens(7, 2) == 4
    )  # 2 of 4 chunks, padded to 8
    # every layer: half the tokens, plus the other rank's keys and values kept for attention's backward
    kv = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim // 2 * (tokens // 2) * e
    assert 0.45 * plain.stage.activations < split.stage.activations - kv < 0.55 * plain.stage.activations
    assert split.logprob_paths["chunked"] < 0.55 * plain.logprob_paths["chunked"]  # the [T/CP, V/TP] logits
    # the distributed optimizer shards over DP × CP; parameters and gradients are whole on every CP rank
    assert split.stage.optimizer_moments == pytest.approx(plain.stage.optimizer_moments / 2, abs=8)
    assert split.stage.params == plain.stage.params and split.stage.grads == plain.stage.grads
    table = format_plan(split, cfg, "test")
    assert "layout: TP 2 × PP 1 × CP 2 × DP 1 = 4 training GPUs" in table and "÷ DP 1 × CP 2" in table


def test_recompute_keeps_only_the_layer_inputs():
    plain, _ = _plan("qwen2.5-3b")
    recomputed, _ = _plan("qwen2.5-3b", "parallel.activation_recompute=true")
    assert recomputed.stage.activations < 0.1 * plain.stage.activations
    tokens, arch = plain.micro_batch_tokens, plain.arch
    assert recomputed.stage.activations > arch.num_layers * tokens * arch.hidden_size * 2


def test_sequence_parallel_is_the_default_and_divides_the_residual_stream_over_tp():
    sp, cfg = _plan("qwen2.5-7b")  # the preset's TP2: sequence parallel by default
    plain, _ = _plan("qwen2.5-7b", "parallel.sequence_parallel=false")
    assert cfg.parallel.sequence_parallel_enabled
    arch, tokens, e = sp.arch, sp.micro_batch_tokens, 2
    # 4h per token and layer (TE: the two LayerNormLinears' inputs and outputs) and the final norm's 2h, ÷ TP 2
    saved = (arch.num_layers * 4 * arch.hidden_size + 2 * arch.hidden_size) * tokens * e // 2
    assert plain.stage.activations - sp.stage.activations == pytest.approx(saved, rel=1e-3)
    # switched off where the ~6 GB it saves decide: the cheapest fix turns it back on
    off = ["parallel.sequence_parallel=false", "cluster.gpu_memory_gb=110"]
    fix = _fix_message("qwen2.5-7b", *NO_ROLLOUT, *off)
    assert "cheapest fix: parallel.sequence_parallel=true (→ " in fix, fix


def test_selective_recompute_sits_between_none_and_full():
    plans = {
        name: _plan("qwen2.5-7b", *overrides)[0].stage.activations
        for name, overrides in {
            "none": [],
            "core_attn": ["parallel.recompute=selective"],  # the default module
            "mlp": ["parallel.recompute=selective", "parallel.recompute_modules=[mlp]"],
            "full": ["parallel.recompute=full"],
            "alias": ["parallel.activation_recompute=true"],
        }.items()
    }
    assert plans["full"] == plans["alias"] < plans["mlp"] < plans["core_attn"] < plans["none"]
    plan, _ = _plan("qwen2.5-7b")
    # TE's flash attention: core_attn recompute keeps only the softmax statistics back (heads / TP per token)
    per_token = plan.arch.num_attention_heads // 2 * plan.arch.num_layers * 2
    assert plans["none"] - plans["core_attn"] == per_token * plan.micro_batch_tokens


def test_spin_plan_says_what_each_scaling_option_buys(capsys):
    assert main(["--arch", "qwen2.5-3b", *PRESET]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^sequence parallel: on \(default at TP > 1\) .* turning it off: \+\d+\.\d\d GB", out, re.M
    )
    assert re.search(r"^recompute: none; versus: selective \[core_attn\] -\d+\.\d\d GB, selective \[mlp\] "
                     r"-\d+\.\d\d GB, full -\d+\.\d\d GB per GPU", out, re.M), out  # fmt: skip
    assert "gradient reduce-scatter" in out and "(overlapped with the backward)" in out  # GPU: on by default
    assert main(["--arch", "qwen2.5-3b", *PRESET, "parallel.overlap_grad_reduce=false"]) == 0
    assert "(exposed), parameter all-gather" in capsys.readouterr().out


def test_pipeline_stage_zero_holds_one_micro_batch_per_stage():
    plan, _ = _plan("qwen2.5-3b", "parallel.pp=4", "parallel.tp=2", world_size=8)
    assert plan.stage.stage == 0 and plan.in_flight == 4 and plan.layers_per_stage == 9
    single, _ = _plan("qwen2.5-3b", "parallel.pp=1", world_size=8)
    # 4 micro-batches × 9 layers = the activations of one micro-batch through all 36 layers
    assert plan.stage.activations == pytest.approx(single.stage.activations, rel=0.05)


def test_interleaving_follows_megatrons_schedule_holds_more_on_stage_zero_and_shrinks_the_bubble():
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from spin_megatron.planning.counting import in_flight_microbatches, stage_layer_indices

    arch = builtin_arch("qwen2.5-3b")  # 36 layers
    for pp, vpp, microbatches in ((4, 3, 64), (4, 3, 5), (2, 2, 3), (4, 1, 2)):
        config = TransformerConfig(num_layers=36, hidden_size=64, num_attention_heads=4,
                                   pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                   virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)  # fmt: skip
        for stage in range(pp):
            chunks = [None] if vpp == 1 else range(vpp)
            megatron = [
                get_transformer_layer_offset(config, vp_stage=v, pp_rank=stage) + i
                for v in chunks
                for i in range(get_num_layers_to_build(config, vp_stage=v, pp_rank=stage))
            ]
            assert stage_layer_indices(arch, pp, stage, vpp) == megatron, (pp, vpp, stage)
            p2p = SimpleNamespace(pp_group=SimpleNamespace(size=lambda p=pp: p, rank=lambda s=stage: s),
                                  virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)  # fmt: skip
            padded = -(-microbatches // pp) * pp if vpp > 1 else microbatches  # placeholders fill a group
            total, _, warmup, _ = get_pp_rank_microbatches(padded, vpp, pp, p2p_communicator=p2p)
            assert in_flight_microbatches(pp, vpp, stage, microbatches) == min(warmup + 1, total)
    plain, _ = _plan("qwen2.5-3b", "parallel.pp=4", "parallel.tp=2", world_size=8)
    chunked, _ = _plan("qwen2.5-3b", "parallel.pp=4", "parallel.tp=2", "parallel.vpp=3", world_size=8)
    assert chunked.stage.stage == 0 and chunked.in_flight == 15 and chunked.layers_in_flight_unit == 3
    # stage 0 holds 1 + (pp − 1)/(pp·vpp) times 1F1B's activations (Narayanan et al.); the bubble shrinks ~vpp-fold
    assert chunked.stage.activations == pytest.approx(plain.stage.activations * (1 + 3 / 12), rel=1e-6)
    assert chunked.stage.num_params == plain.stage.num_params  # the same layers per stage, in other places
    assert chunked.bubble == pytest.approx(3 / (3 * 64 + 3)) and plain.bubble == pytest.approx(3 / (64 + 3))


def test_fused_log_probs_need_far_less_than_naive():
    plan, _ = _plan("qwen2.5-3b")
    paths = plan.logprob_paths
    assert paths["fused"] < 0.2 * paths["chunked"] < paths["chunked"] < 0.5 * paths["naive"]
    assert plan.stage.logprob == paths["fused"]  # the trainer's default path
    logits, _ = _plan("qwen2.5-3b", "trainer.logprob_impl=logits")
    assert logits.stage.logprob == paths["chunked"]


def test_log_prob_formulas_match_the_logged_benchmark():
    """bench/logprob.py in docs/LOG.md: T=4096, hidden 896, vocab 151936, fp32, chunk 512 — peak extra MiB."""
    from spin_megatron.planning.workload import logprob_bytes

    paths = {k: v / 2**20 for k, v in logprob_bytes(4096, 151936, 896, 512, 4, stats=False).items()}
    measured = {"naive": 9007, "chunked": 4782, "fused": 851}
    for path, mib in measured.items():
        assert paths[path] == pytest.approx(mib, rel=0.15), path


def test_colocated_sglang_shares_the_gpu_and_releases_memory_while_training():
    plan, cfg = _plan("qwen2.5-3b")
    s = plan.stage
    assert plan.sglang_weights == plan.full_model_params * 2  # bf16, tp_size 1
    assert plan.sglang_kv == int(0.4 * 80 * GB) - s.resident_at_launch - plan.sglang_weights
    assert plan.generation_peak == int(0.4 * 80 * GB) + s.optimizer_moments + plan.sglang_runtime
    assert plan.sync_bytes_per_step == plan.full_model_params * 2 * 8  # DP 4 × 2 engines
    kept, _ = _plan("qwen2.5-3b", "rollout.sglang.enable_memory_saver=false")
    assert kept.training_peak == plan.training_peak + plan.sglang_weights + plan.sglang_kv
    # weights are released only before a sync: the opponent (spin) and sync_every > 1 keep them while training
    for overrides in (["algorithm.mode=spin"], ["rollout.sync_every=2"]):
        resident, _ = _plan("qwen2.5-3b", *overrides)
        assert resident.training_peak == plan.training_peak + plan.sglang_weights, overrides
    # the opponent is synced at reference refreshes only
    spin, _ = _plan("qwen2.5-3b", "algorithm.mode=spin", "trainer.ref_update_freq=4")
    assert spin.sync_every == 4 and spin.sync_bytes_per_step == plan.sync_bytes_per_step / 4
    never, _ = _plan(
        "qwen2.5-3b", "algorithm.mode=spin", "trainer.ref_update_freq=0", "trainer.mini_batch_size=256"
    )
    assert never.sync_every == 0 and never.sync_bytes_per_step == 0


# ------------------------------------------------------------------------------------------ the check
def test_preset_fits_one_node_of_80gb_gpus():
    plan, cfg = _plan("qwen2.5-3b")
    assert plan.fits and plan.peak <= plan.usable_bytes == int(72 * GB)
    check_fits(plan, cfg)


@pytest.mark.parametrize("preset, gpus", [("qwen3_8b_gsm8k", 8), ("qwen3_30b_a3b_gsm8k", 16)])
def test_qwen3_presets_fit_their_8_gpu_80gb_nodes(preset, gpus):
    cfg = load_config([f"experiment={preset}"])
    plan = estimate(cfg, resolve_arch(cfg)[0], world_size=training_world_size(cfg))
    assert plan.world_size == gpus and plan.fits, plan.problems()


@pytest.mark.parametrize(
    "arch_name, overrides, fix",
    [
        (
            "qwen2.5-3b",
            [*NO_ROLLOUT, "cluster.gpu_memory_gb=40", "trainer.micro_batch_tokens=4096"]
            + ["optim.use_distributed_optimizer=false"],
            "cheapest fix: optim.use_distributed_optimizer=true (→ ",
        ),
        (
            "qwen2.5-3b",
            [*NO_ROLLOUT, "cluster.gpu_memory_gb=40"],
            "cheapest fix: parallel.recompute=selective parallel.recompute_modules=[mlp] (→ ",
        ),
        (
            "qwen2.5-3b",
            ["rollout.sglang.mem_fraction_static=0.2"],
            "cheapest fix: rollout.sglang.mem_fraction_static=",
        ),
        (
            "qwen2.5-7b",
            [*NO_ROLLOUT, "cluster.gpu_memory_gb=40", "parallel.activation_recompute=true"],
            "cheapest fix: parallel.tp=4 (→ ",
        ),
        ("qwen2.5-32b", [], "cluster.nodes=2"),
    ],
)
def test_configurations_that_do_not_fit_name_the_cheapest_fix(arch_name, overrides, fix):
    message = _fix_message(arch_name, *overrides)
    assert message.startswith("does not fit: ") and fix in message, message
    assert re.search(r"needs [\d.]+ GB per GPU > [\d.]+ GB available|KV cache would get", message), message
    changes = message.split("cheapest fix: ")[1].split(" (→ ")[0].split()
    plan, cfg = _plan(arch_name, *overrides)
    fixed_cfg = _with(cfg, [(c.split("=")[0], yaml.safe_load(c.split("=")[1])) for c in changes])
    world = fixed_cfg.cluster.nodes * fixed_cfg.cluster.gpus_per_node
    assert estimate(fixed_cfg, plan.arch, world_size=world).fits  # the named fix really fits


def test_the_trainer_check_is_skipped_without_cuda_and_runs_with_it(monkeypatch):
    cfg = load_config([*PRESET, "model.hf_path=/not/used"])
    arch = builtin_arch("qwen2.5-7b")  # does not fit at TP2 on 80 GB
    check_training_memory(cfg, arch, 8)  # CPU: no-op
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * GB))
    with pytest.raises(ConfigError, match="does not fit: the training phase needs"):
        check_training_memory(cfg, arch, 8)
    check_training_memory(_with(cfg, [("cluster.check_at_start", False)]), arch, 8)
    check_training_memory(cfg, builtin_arch("qwen2.5-3b"), 8)  # fits


# ------------------------------------------------------------------------------------------ command line
def test_cli_prints_the_table_and_exits_0_when_it_fits(capsys):
    assert main(["--arch", "qwen2.5-3b", *PRESET, "cluster.nodes=1", "cluster.gpu_memory_gb=80"]) == 0
    out = capsys.readouterr().out
    for row in (
        "actor parameters",
        "optimizer: Adam moments",
        "activations",
        "log-prob buffers",
        "SGLang KV cache",
    ):
        assert re.search(rf"^{re.escape(row)} +\d+\.\d\d ", out, re.M), row
    assert "TP 2 × PP 1 × DP 4 = 8 training GPUs" in out and "weight sync: 5.75 GB per engine × 8" in out
    assert re.search(r"^verdict: fits — peak \d+\.\d GB \(training\)", out, re.M), out


def test_cli_refuses_what_does_not_fit_with_one_line_and_exit_2(capsys):
    assert main(["--arch", "qwen2.5-7b", *PRESET]) == 2
    captured = capsys.readouterr()
    assert "verdict: DOES NOT FIT" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spin-plan: error: does not fit: the training phase needs "), (
        err
    )
    assert "cheapest fix: parallel.recompute=selective parallel.recompute_modules=[mlp]" in err[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "no model given"),
        (
            ["experiment=tiny_cpu", "cluster.placement=rack"],
            "cluster.placement='rack' is not allowed; choose one of",
        ),
        (
            ["experiment=tiny_cpu", "cluster.rollout_gpus=2"],
            "cluster.rollout_gpus=2 needs cluster.placement=",
        ),
        (["experiment=tiny_cpu", "cluster.memory_headroom=1.5"], "cluster.memory_headroom must be in [0, 1)"),
        (["experiment=tiny_cpu", "cluster.nonsense=1"], "unknown config key cluster.nonsense"),
        (
            ["experiment=tiny_cpu", "parallel.tp=3"],
            "parallel.tp=3 does not divide the model's 4 attention heads",
        ),
    ],
)
def test_cli_configuration_mistakes_are_one_line_errors(capsys, args, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spin-plan: error: ") and fragment in err[0], err


def test_cli_finds_the_shape_of_a_known_model_name_and_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "spin_megatron.plan", *PRESET, "model.dtype=bf16"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "built-in qwen2.5-3b (model.hf_path=Qwen/Qwen2.5-3B-Instruct is not a local folder)" in result.stdout
    )


def test_disaggregated_placement_plans_rollout_gpus_apart(capsys):
    args = ["--arch", "qwen2.5-3b", *PRESET, "cluster.placement=disaggregated", "cluster.rollout_gpus=4"]
    assert (
        main([*args, "parallel.tp=1", "rollout.sglang.mem_fraction_static=0.8"]) == 2
    )  # 4 DP × 2 engines > 4
    assert "the SGLang engines need 8 GPUs" in capsys.readouterr().err
    assert (
        main(
            [*args, "parallel.tp=2", "rollout.sglang.num_engines=2", "rollout.sglang.sync_mode=disaggregated"]
        )
        == 0
    )
    assert "TP 2 × PP 1 × DP 2 = 4 training GPUs" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ measured on CPU
# Tiny configurations whose dominant term differs: the logits (real Qwen2.5 vocabulary), the parameters and the
# optimizer state (many wide layers, small vocabulary), the activations (long micro-batch, small vocabulary).
PROBES = {
    "logits": dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, budget=512, pairs=2),
    "params+optimizer": dict(arch="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
                             tie_word_embeddings=False, budget=256, pairs=1),
    "activations": dict(arch="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False,
                        budget=1024, pairs=4),
    # experts (their parameters, optimizer state and top-k routed activations) dominate
    "moe": dict(arch="qwen3_moe", hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=2, head_dim=32, vocab_size=1024, tie_word_embeddings=False, num_experts=16,
                num_experts_per_tok=4, moe_intermediate_size=384, budget=1024, pairs=4),
}  # fmt: skip
PROMPT_TOKENS, RESPONSE_TOKENS = 32, 96  # a pair = 256 tokens


def _status_bytes(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) << 10


def _probe_worker(spec_json):
    """Child process: build policy + reference of a tiny model, run a reference pass and two DPO steps (the second
    backward with the Adam moments), print the peak RSS growth measured and the estimate."""
    from spin_megatron.config import (
        AlgorithmConfig,
        Config,
        DataConfig,
        ModelConfig,
        ParallelConfig,
        RolloutConfig,
        TrainerConfig,
    )
    from spin_megatron.parallel import init_parallel
    from spin_megatron.parallel.dpo_step import compute_reference_logps, train_step
    from spin_megatron.parallel.packing import ScoredSequence, pack_items
    from spin_megatron.training.policy import build_policy, build_reference, resolve_model_source
    from spin_megatron.training.updates import dpo_settings

    name, hf_dir, budget, pairs, parallel = json.loads(spec_json)
    groups = init_parallel(parallel.get("tp", 1), 1)  # (tp ranks, no data parallelism: all pairs on each)
    cfg = Config(
        parallel=ParallelConfig(**parallel),
        model=ModelConfig(hf_path=hf_dir),
        data=DataConfig(
            train_files=[], val_files=[], max_prompt_tokens=PROMPT_TOKENS, max_gold_tokens=RESPONSE_TOKENS
        ),
        rollout=RolloutConfig(engine="replay", replay_path="unused", n=1, max_new_tokens=RESPONSE_TOKENS),
        algorithm=AlgorithmConfig(mode="spin"),
        trainer=TrainerConfig(test_freq=0, micro_batch_tokens=budget, prompts_per_step=pairs),
    )
    source = resolve_model_source(cfg, groups, groups.tp_size)
    gen, vocab = torch.Generator().manual_seed(0), source.arch.vocab_size
    tokens = torch.randint(0, vocab, (pairs, 2, PROMPT_TOKENS + RESPONSE_TOKENS), generator=gen).tolist()
    items = [[ScoredSequence(t[:PROMPT_TOKENS], t[PROMPT_TOKENS:]) for t in pair] for pair in tokens]
    batches = pack_items(items, token_budget=budget)
    settings = dpo_settings(cfg, source.arch.vocab_size)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = _status_bytes("VmRSS")
    policy = build_policy(cfg, source, groups)
    reference = build_reference(cfg, source, groups, policy)
    compute_reference_logps(reference, groups, batches, settings)
    for _ in range(2):
        train_step(policy.model, policy.optimizer, groups, batches, settings,
                   global_pairs=pairs, global_chosen_tokens=pairs * RESPONSE_TOKENS)  # fmt: skip
    measured = _status_bytes("VmHWM") - base
    plan = estimate(cfg, source.arch, world_size=groups.world_size, kernels="cpu")
    row = {"name": name, "rank": groups.rank, "measured": measured, "predicted": plan.training_peak}
    print(json.dumps({**row, "activations": plan.stage.activations}), flush=True)


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _measure(probes: dict, tmp_path) -> list[dict]:
    """Run each probe (``ranks`` processes, ``parallel`` settings) in processes of its own, side by side; the peak of
    a multi-rank probe is its largest rank's."""
    from spin_megatron.models.tiny import make_tiny_hf_model

    # glibc's dynamic mmap threshold would keep freed activation-sized blocks in the heap (RSS that no tensor
    # uses, the CPU analogue of allocator fragmentation, which cluster.memory_headroom covers): a fixed threshold
    # returns them, so the peak RSS is what was allocated.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    children = []  # one process each (a later probe would reuse heap freed by an earlier one), side by side
    for name, spec in probes.items():
        spec = dict(spec)
        budget, pairs, arch = spec.pop("budget"), spec.pop("pairs"), spec.pop("arch")
        parallel, ranks = spec.pop("parallel", {}), spec.pop("ranks", 1)
        folder = tmp_path / name.replace("+", "_")
        hf_dir = folder if folder.is_dir() else make_tiny_hf_model(folder, arch, seed=0, **spec)
        args = json.dumps([name, str(hf_dir), budget, pairs, parallel])
        code = f"from tests.test_plan import _probe_worker; _probe_worker({json.dumps(args)})"
        if ranks > 1:  # torchrun's environment for each rank (the module runs the same function)
            code = (
                "from spin_megatron.parallel.launch import spawn_local; import sys; "
                f"sys.exit(spawn_local({ranks}, 'tests.workers.memory_probe', [{args!r}]))"
            )
        logs = [tmp_path / f"probe{len(children)}.{kind}" for kind in ("out", "err")]
        with open(logs[0], "w") as out, open(logs[1], "w") as err:
            child = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err, cwd=REPO, env=env)
        children.append((child, logs))
    stdout = ""
    for child, (out, err) in children:
        assert child.wait(timeout=600) == 0, err.read_text()[-3000:]
        stdout += out.read_text()
    rows = {}
    for row in (json.loads(line) for line in stdout.splitlines() if line.startswith("{")):
        if row["name"] not in rows or row["measured"] > rows[row["name"]]["measured"]:
            rows[row["name"]] = row
    assert sorted(rows) == sorted(probes)
    return [rows[name] for name in probes]


def _report(rows) -> str:
    return "; ".join(
        f"{r['name']}: measured {r['measured'] / 2**20:.0f} MiB, predicted {r['predicted'] / 2**20:.0f} MiB"
        for r in rows
    )


@pytest.mark.slow  # launches of measuring processes: ~25 s each
@pytest.mark.skipif(
    not _can_reset_peak_rss(), reason="needs Linux's /proc/self/clear_refs to reset the peak RSS"
)
def test_estimate_matches_measured_peak_memory_of_tiny_cpu_runs(tmp_path):
    rows = _measure(PROBES, tmp_path)
    report = _report(rows)
    print(report)
    for r in rows:
        assert r["predicted"] == pytest.approx(r["measured"], rel=0.25), report


# The activations probe at TP2 with and without sequence parallelism (two ranks each), and at TP1 with selective
# recompute of the core attention and the MLP (issue 24).
SCALING_PROBES = {
    "tp2": {**PROBES["activations"], "parallel": {"tp": 2, "sequence_parallel": False}, "ranks": 2},
    "tp2+sp": {**PROBES["activations"], "parallel": {"tp": 2}, "ranks": 2},
    "selective": {**PROBES["activations"], "parallel": {"recompute": "selective",
                                                        "recompute_modules": ["core_attn", "mlp"]}},
}  # fmt: skip


@pytest.mark.slow  # launches of measuring processes: ~25 s each
@pytest.mark.skipif(
    not _can_reset_peak_rss(), reason="needs Linux's /proc/self/clear_refs to reset the peak RSS"
)
def test_sequence_parallel_and_selective_recompute_estimates_match_measured_peaks(tmp_path):
    rows = {r["name"]: r for r in _measure(SCALING_PROBES, tmp_path)}
    report = _report(rows.values())
    print(report)
    for r in rows.values():
        assert r["predicted"] == pytest.approx(r["measured"], rel=0.25), report
    # sequence parallelism cuts the peak (the norm/residual activations ÷ TP), as predicted
    assert rows["tp2+sp"]["measured"] < rows["tp2"]["measured"], report
    assert rows["tp2+sp"]["activations"] < rows["tp2"]["activations"]
