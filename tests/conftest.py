import os
from pathlib import Path

import pytest
import torch

from spin_megatron.models.tiny import make_tiny_hf_model
from spin_megatron.parallel.launch import usable_cpus

# Under a cgroup CPU quota, torch's default thread count is the host's core count, in every worker, rank and server
# the suite starts; cap it at the CPUs granted (read here, before the xdist workers start, so they inherit it).
_CPUS = usable_cpus()
if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > _CPUS:
    os.environ["OMP_NUM_THREADS"] = str(_CPUS)
    torch.set_num_threads(_CPUS)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPIN_SHARED_DATA", REPO.parent / "shared" / "data"))

# The llama fixture uses Llama-3.1 style RoPE scaling and tied embeddings; qwen2 has QKV bias, untied head.
LLAMA_OVERRIDES = dict(
    num_hidden_layers=2,
    intermediate_size=96,
    max_position_embeddings=16384,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)


LONGEST_GROUPS = (
    "cluster",
    "test_fault_tolerance",
    "test_trainer_e2e",
    "test_sglang_real",
    "test_spin_semantics",
    "test_overlap",
    "test_convert_cli",
    "test_rendezvous",
    "test_moe_training",  # ~2–3 min: four-process layouts + a two-process spin-train
    "test_sglang_moe",  # ~1.5 min: a real SGLang server's start
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # `make test` runs two pytest-xdist workers with --dist loadgroup: each test file is one group (its module
    # fixtures are built once), and files that start Ray or Slurm daemons share the group "cluster" (one at a time)
    for item in items:
        if not any(True for _ in item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    # the longest groups first (measured: 3–9 min each), so that the two workers finish together; NB pytest-xdist's
    # --loadscope-reorder (its default) then hands groups out by test count, so this orders equal-sized ones only
    first = {name: rank for rank, name in enumerate(LONGEST_GROUPS)}
    items.sort(key=lambda item: first.get(item.get_closest_marker("xdist_group").args[0], len(first)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("hf") / "llama", "llama", seed=2, **LLAMA_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """Qwen3: QK-norm, head_dim 24 ≠ hidden/heads, no QKV bias, untied head."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("hf") / "qwen3", "qwen3", seed=3)


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> Path:
    """Qwen3-MoE: 4 layers, all MoE, 4 experts of width 32, top-2 renormalised, untied head."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("hf") / "qwen3_moe", "qwen3_moe", seed=4)


@pytest.fixture(scope="session")
def tiny_qwen3_moe_mixed(tmp_path_factory) -> Path:
    """Another Qwen3-MoE shape: 8 experts, top-3 not renormalised, layer 2 dense (mlp_only_layers), tied."""
    return make_tiny_hf_model(
        tmp_path_factory.mktemp("hf") / "qwen3_moe_mixed", "qwen3_moe", seed=6, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=False, moe_intermediate_size=16, mlp_only_layers=[2],
        head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    path = SHARED_DATA / "qwen2.5-tokenizer"
    if not (path / "vocab.json").is_file():
        pytest.skip(f"Qwen2.5 tokenizer not found at {path} (expected ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    path = SHARED_DATA / "gsm8k"
    if not (path / "train.jsonl").is_file():
        pytest.skip(f"GSM8K not found at {path} (expected ../shared/data beside the checkout)")
    return path


@pytest.fixture
def double():
    """``double(mode=..., delay_s=..., flush_busy=..., fail_update_at=..., state_class=...) -> (url, state)``:
    an SGLang protocol double (tests/sglang_double.py) serving from a thread, stopped after the test."""
    from tests.sglang_double import DoubleState, start_in_thread

    servers = []

    def start(state_class=None, **kwargs):
        state = (state_class or DoubleState)(**kwargs)
        server, url = start_in_thread(state)
        servers.append(server)
        return url, state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def sglang_python():
    """Python of .venv-sglang (a real sglang 0.5.23 for CPU), built now if missing; skipped only when it
    cannot be built here, with the reason."""
    from tests.sglang_real_server import ensure_sglang_venv

    python, why = ensure_sglang_venv()
    if python is None:
        pytest.skip(f"no SGLang server venv: {why}")
    return python


@pytest.fixture(scope="session")
def tiny_qwen_vocab_model(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """A tiny random Qwen2 (hidden 64, 2 layers) with the real Qwen2.5 vocabulary and tokenizer files."""
    return make_tiny_hf_model(
        tmp_path_factory.mktemp("hf") / "qwen2_qwen_vocab", "qwen2", seed=5, tokenizer_dir=qwen_tokenizer_dir,
        vocab_size=151936, num_hidden_layers=2,
    )  # fmt: skip


# Nothing in the suite may reach a model hub (none is reachable here, and a GPU machine has no network): local
# paths only, for this process and every subprocess it starts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
