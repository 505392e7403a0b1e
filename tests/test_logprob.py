"""Log-probs from vocab-parallel logits: values and gradients equal log_softmax(full logits).gather."""

import json

import pytest
import torch

from spin_megatron.algorithm.logprob import TOKEN_STATS, fused_head_logprobs, vocab_parallel_logprobs
from tests.helpers import run_ranks
from tests.workers.logprob import stats_case

TOL = 1e-6  # max|Δ| / max(1, max|reference|), fp32


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def _data(tokens=37, hidden=16, padded=64, vocab=50, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=gen) * 0.5).to(dtype)
    w = torch.randn(padded, hidden, generator=gen).to(dtype)
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    target[::5] = -100
    upstream = torch.randn(tokens, generator=gen)
    return h, w, target, upstream


def _reference(h, w, target, upstream, vocab, temperature):
    h, w = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    logits = (h @ w.t()).detach().requires_grad_()
    logp = torch.log_softmax(logits[:, :vocab] / temperature, -1).gather(1, target.clamp(min=0)[:, None])[
        :, 0
    ]
    logp = torch.where(target != -100, logp, torch.zeros_like(logp))
    (logp * upstream).sum().backward()
    grad_logits = logits.grad
    return logp.detach(), grad_logits, grad_logits @ w.detach(), grad_logits.t() @ h.detach()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_chunked_matches_log_softmax(temperature, chunk):
    h, w, target, upstream = _data()
    ref_logp, ref_grad, _, _ = _reference(h, w, target, upstream, 50, temperature)
    logits = (h @ w.t()).requires_grad_()
    logp = vocab_parallel_logprobs(
        logits, target, temperature=temperature, vocab_size=50, chunk_tokens=chunk, backend="chunked"
    )
    (logp * upstream).sum().backward()
    assert logp.dtype == torch.float32 and logp.shape == target.shape
    assert _rel(logp, ref_logp) <= TOL and _rel(logits.grad, ref_grad) <= TOL
    assert torch.all(logp[target == -100] == 0) and torch.all(logits.grad[target == -100] == 0)
    assert torch.all(logits.grad[:, 50:] == 0)  # padded vocabulary columns get no gradient


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_head_matches_log_softmax(temperature):
    h, w, target, upstream = _data(tokens=41)
    ref_logp, _, ref_dh, ref_dw = _reference(h, w, target, upstream, 50, temperature)
    h, w = h.requires_grad_(), w.requires_grad_()
    logp = fused_head_logprobs(h, w, target, temperature=temperature, vocab_size=50, chunk_tokens=6)
    (logp * upstream).sum().backward()
    assert _rel(logp, ref_logp) <= TOL
    assert _rel(h.grad, ref_dh) <= TOL and _rel(w.grad, ref_dw) <= TOL


def test_batched_shapes_and_no_padding():
    h, w, target, upstream = _data(tokens=24, padded=50)
    ref_logp, _, _, _ = _reference(h, w, target, upstream, 50, 1.0)
    logits = (h @ w.t()).view(4, 6, 50)
    logp = vocab_parallel_logprobs(logits, target.view(4, 6), backend="chunked")
    assert logp.shape == (4, 6) and _rel(logp.view(-1), ref_logp) <= TOL
    fused = fused_head_logprobs(h.view(4, 6, -1), w, target.view(4, 6))
    assert _rel(fused.view(-1), ref_logp) <= TOL


def test_bf16_inputs_are_scored_in_fp32():
    h, w, target, upstream = _data(dtype=torch.bfloat16)
    ref_logp, ref_grad, _, _ = _reference(h, w, target, upstream, 50, 1.0)
    logits = (h.float() @ w.float().t()).to(torch.bfloat16).requires_grad_()
    logp = vocab_parallel_logprobs(logits, target, vocab_size=50, backend="chunked")
    (logp * upstream).sum().backward()
    assert logp.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    assert _rel(logp, ref_logp) <= 5e-2


def test_input_checks():
    h, w, target, _ = _data()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vocab_parallel_logprobs(h @ w.t(), target, temperature=0.0)
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_logprobs(h @ w.t(), target[:-1])
    with pytest.raises(ValueError, match="backend"):
        vocab_parallel_logprobs(h @ w.t(), target, backend="triton")
    with pytest.raises(ValueError, match="vocab_size 80"):
        vocab_parallel_logprobs(h @ w.t(), target, vocab_size=80)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_token_stats_match_dense_reference(temperature, chunk):
    # fused, chunked and the TE backend's no-grad pass; padded rows, ignored positions and a tie in the data
    for path, errors in stats_case(None, 0, 1, temperature, chunk).items():
        for what, err in errors.items():
            assert err <= TOL, (path, what, err)


def test_token_stats_are_opt_in_and_checked():
    h, w, target, _ = _data()
    assert isinstance(fused_head_logprobs(h, w, target, vocab_size=50), torch.Tensor)
    assert isinstance(
        vocab_parallel_logprobs(h @ w.t(), target, vocab_size=50, backend="chunked"), torch.Tensor
    )
    logp, stats = fused_head_logprobs(h, w, target, vocab_size=50, stats=("is_top1", "entropy"))
    assert list(stats) == ["is_top1", "entropy"] and all(v.shape == logp.shape for v in stats.values())
    for bad in (("entropy", "perplexity"), "entropy"):
        with pytest.raises(ValueError, match="stats must be a tuple of names from .*log_sum_sq_probs"):
            vocab_parallel_logprobs(h @ w.t(), target, backend="chunked", stats=bad)
        with pytest.raises(ValueError, match="stats must be a tuple of names"):
            fused_head_logprobs(h, w, target, stats=bad)
    assert TOKEN_STATS == ("entropy", "mean_logit", "is_top1", "log_sum_sq_probs")


@pytest.mark.dist
def test_tensor_parallel_two_ranks(tmp_path):
    out = tmp_path / "logprob.json"
    assert run_ranks(2, "tests.workers.logprob", "--out", out) == 0
    for rank_report in json.loads(out.read_text()):
        for temperature, paths in rank_report.items():
            for path, errors in paths.items():
                for what, err in errors.items():
                    assert err <= TOL, (temperature, path, what, err)


def test_te_version_rules():
    from spin_megatron.algorithm import logprob

    assert logprob.parse_version("2.10.0+cu130") == (2, 10) and logprob.parse_version("2.9.0a0") == (2, 9)
    assert not logprob.te_cross_entropy_usable(None) and not logprob.te_cross_entropy_usable((2, 7))
    assert logprob.te_cross_entropy_usable((2, 8))  # per-row backward fixed in 2.8
    assert logprob.te_overwrites_input((2, 11)) and not logprob.te_overwrites_input((2, 19))


def test_te_backend_without_a_usable_te_is_a_clear_error():
    from spin_megatron.algorithm import logprob

    if logprob.te_cross_entropy_usable(logprob.te_version()):
        pytest.skip("a usable TransformerEngine is installed")
    with pytest.raises(ValueError, match=r"backend='te' needs TransformerEngine ≥ 2.8"):
        logprob.vocab_parallel_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), backend="te")
