"""spin-train's configuration: presets compose, and every mistake is one line naming the key, exit code 2,
before any process group starts (these run in-process in well under a second each)."""

from pathlib import Path

import pytest

from spin_megatron.config import Config
from spin_megatron.train import load_config, main


def _error(capsys, *overrides):
    code = main(list(overrides))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("spin-train: error: "), err
    return err


def test_tiny_cpu_preset_composes():
    cfg = load_config(
        ["experiment=tiny_cpu", "rollout.n=3", "algorithm.pairs_per_prompt=3", "algorithm.beta=0.2"]
    )
    assert isinstance(cfg, Config)
    assert cfg.model.tiny.hidden_size == 64 and cfg.algorithm.mode == "spin"
    assert cfg.rollout.n == 3 and cfg.algorithm.beta == 0.2 and cfg.trainer.ref_update_freq == 2


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["experiment=tiny_cpu", "trainer.nonsense=1"], "unknown config key trainer.nonsense"),
        (["experiment=tiny_cpu", "trainer.total_steps=many"], "invalid value for trainer.total_steps"),
        (
            ["experiment=tiny_cpu", "algorithm.loss_type=kto"],
            "algorithm.loss_type='kto' is not allowed; choose one of sigmoid, robust, hinge, ipo",
        ),
        (
            ["experiment=tiny_cpu", "algorithm.mode=offline"],
            "algorithm.mode='offline' is not allowed; choose one of online, spin",
        ),
        (
            ["experiment=tiny_cpu", "algorithm.mode=online", "rollout.n=1"],
            "algorithm.mode=online needs rollout.n ≥ 2",
        ),
        (
            ["experiment=tiny_cpu", "rollout.engine=vllm"],
            "rollout.engine='vllm' is not allowed; choose one of hf, sglang, replay",
        ),
        (["experiment=tiny_cpu", "rollout.temperature=0"], "rollout.temperature must be > 0"),
        (["experiment=tiny_cpu", "logging.wandb.mode=cloud"], "logging.wandb.mode='cloud' is not allowed"),
        (
            ["experiment=tiny_cpu", "rollout.engine=replay", "rollout.replay_path=x.jsonl"],
            "set trainer.test_freq=0",
        ),
        (["experiment=tiny_cpu", "parallel.tp=2"], "world size 1 is not divisible by tp×pp = 2×1 = 2"),
        (
            ["experiment=tiny_cpu", "data.train_files=[/nonexistent/train.jsonl]"],
            "data.train_files: /nonexistent/train.jsonl does not exist",
        ),
        (
            ["experiment=tiny_cpu", "rollout.sglang.mem_fraction_static=1.5"],
            "rollout.sglang.mem_fraction_static",
        ),
        (
            ["experiment=qwen2.5_3b_gsm8k", "rollout.sglang.launcher=ray"],  # the preset says colocated
            "rollout.sglang.sync_mode cannot be colocated with launcher=ray",
        ),
        (["model.hf_path=/nonexistent/model"], "config.json not found"),
        (
            ["experiment=tiny_cpu", "trainer.device=tpu"],
            "trainer.device='tpu' is not allowed; choose one of auto, cuda",
        ),
    ],
)
def test_mistakes_are_one_line_errors(capsys, overrides, fragment):
    assert fragment in _error(capsys, *overrides)


def test_the_sbatch_ray_overrides_compose_over_a_colocated_preset():
    cfg = load_config(
        [
            "experiment=qwen2.5_3b_gsm8k",
            "rollout.sglang.launcher=ray",
            "rollout.sglang.ray_address=10.0.0.3:6379",
        ]
        + ["rollout.sglang.sync_mode=auto", "rollout.sglang.enable_memory_saver=false"]
        + ["cluster.nodes=4", "cluster.placement=disaggregated", "cluster.rollout_gpus=16"]
    )
    sglang = cfg.rollout.sglang
    assert (sglang.launcher, sglang.ray_address, sglang.sync_mode) == ("ray", "10.0.0.3:6379", "auto")


def test_parallel_sizes_are_checked_against_the_model(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    err = _error(capsys, "experiment=tiny_cpu", "parallel.tp=3")
    assert (
        "parallel.tp=3 does not divide the model's 4 attention heads; valid values for this model: 1, 2"
        in err
    )
    monkeypatch.setenv("WORLD_SIZE", "3")
    err = _error(capsys, "experiment=tiny_cpu", "parallel.pp=3")
    assert "parallel.pp=3 does not divide the model's 2 layers" in err
    # interleaving: chunks of whole layers, and only with pipeline stages
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = _error(capsys, "experiment=tiny_cpu", "parallel.pp=2", "parallel.vpp=2")
    assert "parallel.pp×parallel.vpp = 2×2 model chunks do not divide the model's 2 layers; valid" in err
    err = _error(capsys, "experiment=tiny_cpu", "parallel.vpp=2")
    assert "parallel.vpp=2 interleaves pipeline stages, but parallel.pp=1: set parallel.pp > 1" in err


def test_resume_never_refuses_an_existing_run(capsys, tmp_path):
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000002" / "COMPLETE").write_text("")
    err = _error(capsys, "experiment=tiny_cpu", f"trainer.output_dir={tmp_path}", "trainer.resume=never")
    assert "already holds checkpoints (latest step_0000002); use trainer.resume=auto" in err


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))
)
def test_every_preset_composes(preset):
    cfg = load_config([f"experiment={preset}"])
    assert cfg.trainer.output_dir.startswith("runs/")


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_a_run_that_expects_cuda_stops_where_there_is_none(capsys):
    message = _error(capsys, "experiment=tiny_cpu", "trainer.device=cuda")
    assert "trainer.device=cuda but CUDA is not available" in message and "trainer.device=auto" in message


def test_shared_data_location_follows_spin_shared_data(tmp_path, monkeypatch):
    from spin_megatron.config import default_tokenizer, shared_data_dir

    (tmp_path / "qwen2.5-tokenizer").mkdir()
    (tmp_path / "qwen2.5-tokenizer" / "vocab.json").write_text("{}")
    monkeypatch.setenv("SPIN_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path and default_tokenizer() == str(tmp_path / "qwen2.5-tokenizer")


MOE = ["experiment=tiny_cpu", "model.tiny.architecture=qwen3_moe"]


@pytest.mark.parametrize(
    "world_size, overrides, fragment",
    [
        (
            2,
            ["experiment=tiny_cpu", "parallel.ep=2"],
            "parallel.ep=2 splits experts, but Qwen2ForCausalLM has none",
        ),
        (3, [*MOE, "parallel.ep=3"], "parallel.ep=3 does not divide the model's 4 experts; valid values"),
        (
            1,
            [*MOE, "parallel.ep=2"],
            "parallel.ep × etp = 2×1 = 2 does not divide the 1 ranks of a pipeline stage",
        ),
        (
            2,
            [*MOE, "parallel.tp=2", "parallel.sequence_parallel=false"],
            "parallel.tp=2 with a mixture-of-experts model (Qwen3MoeForCausalLM) needs sequence parallelism",
        ),
        (6, [*MOE, "parallel.tp=2", "parallel.ep=2", "parallel.etp=3"], "parallel.etp=3 does not divide"),
        (
            1,
            [*MOE, "parallel.moe_token_dispatcher=flex"],
            "parallel.moe_token_dispatcher='flex' is not allowed",
        ),
        (1, [*MOE, "model.moe_aux_loss_coeff=-1"], "model.moe_aux_loss_coeff must be ≥ 0"),
    ],
)
def test_moe_layout_mistakes_are_one_line_errors(capsys, monkeypatch, world_size, overrides, fragment):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert fragment in _error(capsys, *overrides)


@pytest.mark.parametrize(
    "world_size, overrides, fragment",
    [  # issue 24: sequence parallelism, recomputation, DDP overlap
        (1, ["parallel.sequence_parallel=true"], "parallel.sequence_parallel=true splits the sequence over the "
         "tensor-parallel ranks, but parallel.tp=1: set parallel.tp > 1 or remove parallel.sequence_parallel"),
        (1, ["parallel.recompute=partial"], "parallel.recompute='partial' is not allowed; choose one of none, full"),
        (1, ["parallel.recompute_modules=[mlp]"], "parallel.recompute_modules applies to parallel.recompute="
         "selective (got recompute=none)"),
        (1, ["parallel.recompute=selective", "parallel.recompute_modules=[attention]"],
         "parallel.recompute_modules='attention' is not allowed; choose one of core_attn, mlp, moe"),
        (1, ["parallel.recompute=selective", "parallel.activation_recompute=true"],
         "parallel.activation_recompute=true means parallel.recompute=full, but parallel.recompute=selective"),
        (1, ["parallel.overlap_param_gather=true", "optim.use_distributed_optimizer=false"],
         "parallel.overlap_param_gather overlaps the distributed optimizer's parameter all-gather, but "
         "optim.use_distributed_optimizer=false"),
        (1, ["parallel.ddp_bucket_size=0"], "parallel.ddp_bucket_size must be > 0, got 0"),
    ],
)  # fmt: skip
def test_scaling_feature_mistakes_are_one_line_errors(capsys, monkeypatch, world_size, overrides, fragment):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert fragment in _error(capsys, "experiment=tiny_cpu", *overrides)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without TE and CUDA")
def test_recompute_modules_that_need_te_are_refused_on_the_cpu(capsys):
    for module in ("layernorm", "moe_act"):
        err = _error(capsys, "experiment=tiny_cpu", "parallel.recompute=selective",
                     f"parallel.recompute_modules=[core_attn,{module}]")  # fmt: skip
        assert f"parallel.recompute_modules=['{module}'] needs TransformerEngine on CUDA" in err, err


def test_scaling_defaults_resolve_without_being_written_back():
    """Nulls are resolved by properties (sequence parallelism by tp; overlaps by the device in parallel/ddp.py):
    the schema's defaults stay null whatever an instance resolved (Hydra builds them from an instance)."""
    from spin_megatron.config import ParallelConfig
    from spin_megatron.parallel.ddp import overlap_settings

    assert ParallelConfig(tp=2).sequence_parallel_enabled and not ParallelConfig().sequence_parallel_enabled
    assert not ParallelConfig(tp=2, sequence_parallel=False).sequence_parallel_enabled
    assert ParallelConfig(tp=2).sequence_parallel is None and ParallelConfig().sequence_parallel is None
    assert ParallelConfig(activation_recompute=True).recompute_granularity == "full"
    assert ParallelConfig(recompute="selective").selective_modules == ["core_attn"]
    cfg = load_config(["experiment=tiny_cpu", "parallel.tp=2"])
    assert cfg.parallel.sequence_parallel is None and cfg.parallel.sequence_parallel_enabled
    assert load_config(["experiment=tiny_cpu"]).parallel.sequence_parallel is None
    par = ParallelConfig()
    assert overlap_settings(par, distributed_optimizer=True, cuda=True) == (True, True)
    assert overlap_settings(par, distributed_optimizer=True, cuda=False) == (False, False)
    assert overlap_settings(par, distributed_optimizer=False, cuda=True) == (True, False)


def test_sglang_is_refused_for_a_qwen3_moe_checkpoint_with_dense_layers(capsys, tiny_qwen3_moe_mixed):
    err = _error(capsys, "experiment=tiny_cpu", "model.tiny=null", f"model.hf_path={tiny_qwen3_moe_mixed}",
                 "rollout.engine=sglang")  # fmt: skip
    assert "layers [2] are dense (mlp_only_layers / decoder_sparse_step) and SGLang 0.5.23 builds" in err


@pytest.mark.parametrize(
    "world_size, overrides, fragment",
    [
        (1, ["parallel.cp=0"], "parallel.cp must be > 0, got 0"),
        (3, ["parallel.cp=2"], "world size 3 is not divisible by tp×pp×cp = 1×1×2 = 2"),
        (4, ["parallel.tp=2", "parallel.cp=4"], "world size 4 is not divisible by tp×pp×cp = 2×1×4 = 8"),
        (
            2,
            ["model.tiny.architecture=qwen3_moe", "parallel.cp=2"],
            "parallel.cp=2 with a mixture-of-experts",
        ),
        (
            8,
            [
                "parallel.cp=8",
                "data.max_prompt_tokens=6",
                "rollout.max_new_tokens=4",
                "data.max_gold_tokens=4",
            ],
            "parallel.cp=8 cuts every sequence into 2·cp = 16 chunks, but no sequence of this run can have more "
            "than 10 tokens",
        ),
    ],
)
def test_context_parallel_mistakes_are_one_line_errors(capsys, monkeypatch, world_size, overrides, fragment):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert fragment in _error(capsys, "experiment=tiny_cpu", *overrides)
