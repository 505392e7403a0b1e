"""GPU: the SGLang reward-model backend launching a real SGLang server (bf16, CUDA) on a tiny random
LlamaForSequenceClassification (num_labels=1) and scoring token ids; the scores must match transformers'
AutoModelForSequenceClassification (float32 compute on the same bf16-valued weights) to bf16 accuracy, and rank
the conversations the same way. Rendering is not the point here (tests/test_reward_model_sglang.py checks it, and
the same client against a real CPU server); needs SGLang installed beside CUDA (tools/gpu_check.py)."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from spin_megatron.ports import pick_free_port
from spin_megatron.reward_model.sglang import RewardSGLangConfig, SGLangRewardModel
from tests.helpers import missing

pytestmark = pytest.mark.gpu

VOCAB = 512
# head_dim 64: every SGLang attention backend supports it
TINY = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=1024, tie_word_embeddings=False, num_labels=1, pad_token_id=0,
    bos_token_id=None, eos_token_id=None, architectures=["LlamaForSequenceClassification"],
)  # fmt: skip


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    if importlib.util.find_spec("sglang") is None:
        missing("sglang", "SGLang is not installed (pip install 'spin-megatron[sglang]')")
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
        for (
            param
        ) in model.parameters():  # bf16-valued weights: the server and the reference read the same ones
            param.copy_(param.to(torch.bfloat16).float())
    out = tmp_path_factory.mktemp("hf") / "llama_rm"
    model.save_pretrained(out, safe_serialization=True)
    return out


@torch.no_grad()
def reference_scores(rm_dir, ids_list):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).cuda().eval()
    return [float(model(input_ids=torch.tensor([ids], device="cuda")).logits[0, 0]) for ids in ids_list]


def test_a_launched_gpu_reward_server_scores_like_transformers(rm_dir, tmp_path):
    generator = torch.Generator().manual_seed(1)
    ids_list = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in (5, 17, 33, 64, 9, 120)]
    config = RewardSGLangConfig(
        dtype="bfloat16", mem_fraction_static=0.3, base_port=pick_free_port(), health_timeout_s=600,
        log_dir=str(tmp_path / "logs"), extra_server_args=("--disable-cuda-graph",),
    )  # fmt: skip
    no_rendering = SimpleNamespace(chat_template="unused: token ids are scored directly")
    with SGLangRewardModel(str(rm_dir), config=config, micro_batch_size=4, tokenizer=no_rendering) as model:
        scores = model.score_ids(ids_list)
        again = model.score_ids(ids_list)  # prefix-cache hits now
    reference = reference_scores(rm_dir, ids_list)
    spread = max(reference) - min(reference)
    assert spread > 1.0
    for served in (scores, again):
        assert max(abs(a - b) for a, b in zip(served, reference)) < 0.05 * spread
    order = sorted(range(len(reference)), key=reference.__getitem__)
    gaps = [reference[order[i + 1]] - reference[order[i]] for i in range(len(order) - 1)]
    if min(gaps) > 0.1 * spread:  # well-separated scores must come back in the same order
        assert sorted(range(len(scores)), key=scores.__getitem__) == order
