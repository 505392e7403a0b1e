"""GPU smoke: TransformerEngine's parallel_cross_entropy path equals the chunked fallback (values and grads)."""

import pytest
import torch

from spin_megatron.logprob import te_cross_entropy_available, vocab_parallel_logprobs
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
