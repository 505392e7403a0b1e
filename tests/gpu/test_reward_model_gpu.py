"""GPU: the in-process reward model on CUDA (bf16) scores as on CPU (fp32), and an online run with it on the
engine rank's GPU completes; the planner's reward-model term bounds what scoring allocated. Skipped without
CUDA; run with `make gpu-smoke`."""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from tests.reward_models import make_random_reward_model, make_sevens_reward_model
from tests.synthetic_task import make_char_tokenizer, make_prompt_file

pytestmark = pytest.mark.gpu


def test_bf16_scores_on_cuda_match_fp32_on_cpu_and_fit_the_planners_term(tmp_path):
    from spin_megatron.reward_model.hf import HFRewardModel

    path = make_random_reward_model(tmp_path / "rm", make_char_tokenizer(tmp_path / "tok"), hidden=64)
    conversations = [[{"role": "user", "content": "q" * (3 * i)}, {"role": "assistant", "content": "7a" * i}]
                     for i in range(1, 17)]  # fmt: skip
    cpu = HFRewardModel(str(path), micro_batch_size=4).score(conversations)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    gpu = HFRewardModel(str(path), micro_batch_size=4, dtype="bfloat16", device="cuda").score(conversations)
    assert gpu == pytest.approx(cpu, abs=0.05 * max(1.0, max(abs(s) for s in cpu)))
    from spin_megatron.planning.counting import reward_model_params

    config = json.loads((path / "config.json").read_text())
    tokens = 4 * max(len(c[0]["content"]) + len(c[1]["content"]) + 8 for c in conversations)
    planned = reward_model_params(config) * 2 + tokens * (4 * 64 + 2 * 128) * 2
    assert torch.cuda.max_memory_allocated() - base <= 4 * planned  # CUDA allocator granularity on tiny sizes


def test_online_run_with_the_reward_model_on_the_gpu(tmp_path):
    tokenizer = make_char_tokenizer(tmp_path / "tok")
    rm = make_sevens_reward_model(tmp_path / "rm", tokenizer)
    from transformers import AutoTokenizer

    prompts = make_prompt_file(tmp_path / "p.jsonl", n=16)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "spin_megatron.train", "experiment=tiny_cpu", "model.dtype=bf16",
         "algorithm.mode=online", "rollout.n=2", "algorithm.reward=tests.synthetic_task:sevens",
         f"reward_model.path={rm}", "reward_model.dtype=bfloat16",
         f"model.tiny.vocab_size={len(AutoTokenizer.from_pretrained(tokenizer))}", f"model.tokenizer_path={tokenizer}",
         f"data.train_files=[{prompts}]", f"data.val_files=[{prompts}]", "data.instruction=''",
         "trainer.total_steps=2", "trainer.test_freq=0", f"trainer.output_dir={out}", "logging.progress_bar=false"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/model_mean" in m for m in metrics)
