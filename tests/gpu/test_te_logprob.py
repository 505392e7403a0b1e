"""GPU smoke: TransformerEngine's parallel_cross_entropy path equals the chunked fallback (values and grads)."""

import pytest
import torch

from spin_megatron.algorithm.logprob import te_cross_entropy_available, vocab_parallel_logprobs
from tests.helpers import missing

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_te_matches_chunked(temperature):
    if not te_cross_entropy_available():
        missing("te", "TransformerEngine is not installed")
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(2, 64, 1024, device="cuda", generator=gen) * 2
    target = torch.randint(0, 1000, (2, 64), device="cuda", generator=gen)
    target[:, :8] = -100
    upstream = torch.randn(2, 64, device="cuda", generator=gen)
    results = {}
    for backend in ("te", "chunked"):
        x = logits.clone().requires_grad_()
        logp = vocab_parallel_logprobs(x, target, temperature=temperature, vocab_size=1000, backend=backend)
        (logp * upstream).sum().backward()
        results[backend] = (logp.detach(), x.grad)
    torch.testing.assert_close(results["te"][0], results["chunked"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["te"][1], results["chunked"][1], atol=1e-5, rtol=1e-5)


def test_fused_head_matches_te_cross_entropy_on_3d_logits():
    """The trainer's two log-prob paths on the same hidden states and head weight (bf16, padded vocabulary): the
    fused head vs TE's cross-entropy on the full 3-D logits, values and both gradients under a per-row upstream."""
    if not te_cross_entropy_available():
        missing("te", "TransformerEngine is not installed")
    from spin_megatron.algorithm.logprob import fused_head_logprobs

    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = (torch.randn(2, 256, 128, device="cuda", generator=gen) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(1152, 128, device="cuda", generator=gen) * 0.05).bfloat16().requires_grad_()
    target = torch.randint(0, 1100, (2, 256), device="cuda", generator=gen)
    upstream = torch.randn(2, 256, device="cuda", generator=gen)
    results = []
    for fused in (True, False):
        hidden.grad = weight.grad = None
        if fused:
            logp = fused_head_logprobs(hidden, weight, target, vocab_size=1100)
        else:
            logp = vocab_parallel_logprobs(hidden @ weight.t(), target, vocab_size=1100, backend="te")
        (logp * upstream).sum().backward()
        results.append((logp.detach(), hidden.grad.float(), weight.grad.float()))
    for got, ref, bound in zip(results[0], results[1], (2e-3, 2e-2, 2e-2)):
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= bound
