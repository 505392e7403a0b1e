"""Single-process (TP1/PP1) Megatron model vs transformers; the multi-rank layouts are in test_dist_parity.py."""

from functools import partial

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from transformers import AutoModelForCausalLM

from spin_megatron.models import build_gpt_model, load_arch
from spin_megatron.models.hf_io import HFReader
from spin_megatron.models.mapping import mapping_for
from spin_megatron.models.weights import check_hf_checkpoint, load_hf_weights
from spin_megatron.parallel import init_parallel
from spin_megatron.parallel.schedule import forward_logits
from spin_megatron.parallel.weight_export import export_hf_weights


@pytest.fixture(scope="module")
def groups():
    return init_parallel(1, 1)


def _load(hf_dir, groups, dtype=torch.float32):
    arch = load_arch(hf_dir)
    mapping = mapping_for(arch, arch.padded_vocab_size(groups.tp_size))
    reader = HFReader(hf_dir)
    check_hf_checkpoint(reader, mapping)
    model = build_gpt_model(arch, groups, dtype=dtype)
    load_hf_weights(model, reader, mapping, groups)
    return model.eval(), arch, mapping


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_logits_match_transformers(fixture, groups, request):
    hf_dir = request.getfixturevalue(fixture)
    model, arch, _ = _load(hf_dir, groups)
    ids = torch.randint(0, arch.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    ours = forward_logits(model, groups, ids, arch.vocab_size)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(ids).logits
    assert ours.shape == ref.shape
    assert _rel_err(ours, ref) <= 1e-5


def test_export_reproduces_the_hf_checkpoint_bit_exactly(tiny_qwen2, groups):
    model, _, mapping = _load(tiny_qwen2, groups)
    reader = HFReader(tiny_qwen2)
    exported = dict(export_hf_weights(model, mapping, groups))
    assert sorted(exported) == sorted(reader.names())
    for name, tensor in exported.items():
        assert torch.equal(tensor, reader.get(name)), name


def test_packed_sequences_match_separate_forwards(tiny_qwen2, groups):
    model, arch, _ = _load(tiny_qwen2, groups)
    lengths = [5, 9, 3]
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, arch.vocab_size, (n,), generator=gen) for n in lengths]
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9
    )
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, positions, None, packed_seq_params=params)[0]
        separate = torch.cat([model(s[None], torch.arange(len(s))[None], None)[0] for s in seqs])
    assert _rel_err(packed, separate) <= 1e-5


def test_bf16_model_builds_and_runs(tiny_llama, groups):
    model, arch, _ = _load(tiny_llama, groups, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = forward_logits(model, groups, ids, arch.vocab_size)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_final_norm_is_given_explicitly_not_left_to_apex(tiny_qwen2, groups, monkeypatch):
    """With apex installed and TE absent, Megatron's default final norm is apex FusedLayerNorm, which rejects
    RMSNorm: the local spec names its own norm for the whole block."""
    from megatron.core.transformer import transformer_block

    class ApexStandIn(torch.nn.Module):  # what Megatron would pick with apex present
        def __init__(self, *args, **kwargs):
            raise AssertionError("the final norm was left to Megatron's apex/TE default")

    monkeypatch.setattr(transformer_block, "LayerNormImpl", ApexStandIn)
    model, arch, _ = _load(tiny_qwen2, groups)
    norm = model.decoder.final_layernorm
    assert type(norm) is type(model.decoder.layers[0].input_layernorm)


def test_te_spec_choice_by_dtype_and_version():
    from spin_megatron.models.builder import te_spec_usable

    assert not te_spec_usable(torch.float32, None) and not te_spec_usable(torch.bfloat16, None)
    assert te_spec_usable(torch.bfloat16, (2, 9)) and not te_spec_usable(torch.float32, (2, 10))
    assert te_spec_usable(torch.float32, (2, 11))  # fp32 THD attention from TE 2.11


@pytest.mark.parametrize("fused", [True, False])
def test_fused_swiglu_switch(groups, fused):
    from spin_megatron.models.builder import transformer_config

    arch = load_arch_from_tiny()
    config = transformer_config(arch, groups, fused_swiglu=fused)
    assert config.bias_activation_fusion == (fused and torch.cuda.is_available())


def load_arch_from_tiny():
    from spin_megatron.models.arch import arch_from_hf_config

    return arch_from_hf_config({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "vocab_size": 250, "num_attention_heads": 4, "num_key_value_heads": 2,
    })  # fmt: skip


def test_bf16_policy_skips_the_fp32_upcast_for_the_fused_head_without_changing_anything(tiny_qwen2, groups):
    """Float16Module upcasts a bf16 model's output to fp32; the fused head casts hidden states back to the
    head's dtype, so the trainer asks for bf16 output: same log-probs and gradients, bit for bit."""
    from megatron.core.transformer.module import Float16Module

    from spin_megatron.models.builder import expose_hidden_states
    from spin_megatron.parallel.dpo_step import DPOSettings
    from spin_megatron.parallel.forward import forward_batch, head_weight, token_logprobs
    from spin_megatron.parallel.packing import ScoredSequence, pack_items

    arch = load_arch(tiny_qwen2)
    mapping = mapping_for(arch, arch.padded_vocab_size(groups.tp_size))
    model = build_gpt_model(arch, groups, dtype=torch.bfloat16, perform_initialization=False)
    load_hf_weights(model, HFReader(tiny_qwen2), mapping, groups)
    expose_hidden_states(model)
    wrapped = Float16Module(model.config, model)
    items = [[ScoredSequence([1, 2, 3], [4, 5, 6, 7]), ScoredSequence([1, 2, 3], [8, 9])]]
    (batch,) = pack_items(items, token_budget=64)
    settings = DPOSettings(beta=0.1, vocab_size=arch.vocab_size, fused_head=True)
    results = []
    for keep in (False, True):
        wrapped.zero_grad(set_to_none=True)
        output = forward_batch(batch, wrapped, keep_dtype=keep)
        assert output.dtype == (torch.bfloat16 if keep else torch.float32)
        logps = token_logprobs(output, batch, groups, settings, weight=head_weight(wrapped))
        logps.sum().backward()
        grads = [p.grad.clone() for p in wrapped.parameters() if p.grad is not None]
        results.append((logps.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("fused", [True, False])
def test_the_trainer_keeps_a_bf16_policy_output_in_bf16_on_both_log_prob_paths(tiny_qwen2, groups, fused):
    """The schedule's forward step asks Float16Module for bf16 output on the logits path too (issue 26: a
    [T, V] fp32 copy of the logits and its gradient at 16 K tokens × 152 K vocabulary is ~20 GB); the chunked
    log-probs and every gradient are bit-identical to the upcast path."""
    from megatron.core.transformer.module import Float16Module

    from spin_megatron.models.builder import expose_hidden_states
    from spin_megatron.parallel.dpo_step import DPOSettings, _no_loss
    from spin_megatron.parallel.forward import forward_batch, head_weight, run_packed, token_logprobs
    from spin_megatron.parallel.packing import ScoredSequence, pack_items

    arch = load_arch(tiny_qwen2)
    model = build_gpt_model(arch, groups, dtype=torch.bfloat16, perform_initialization=False)
    load_hf_weights(model, HFReader(tiny_qwen2), mapping_for(arch, arch.padded_vocab_size(1)), groups)
    if fused:
        expose_hidden_states(model)
    wrapped = Float16Module(model.config, model)
    items = [[ScoredSequence([1, 2, 3], [4, 5, 6, 7]), ScoredSequence([1, 2, 3], [8, 9])]]
    (batch,) = pack_items(items, token_budget=64)
    settings = DPOSettings(beta=0.1, vocab_size=arch.vocab_size, fused_head=fused)
    seen = []

    def capture(batch, output, *, settings, weight=None):
        seen.append(output.dtype)
        return _no_loss(output)

    run_packed(wrapped, groups, [batch], partial(capture, settings=settings), forward_only=True)
    assert seen == [torch.bfloat16]
    results = []
    for keep in (False, True):
        wrapped.zero_grad(set_to_none=True)
        output = forward_batch(batch, wrapped, keep_dtype=keep)
        weight = head_weight(wrapped) if fused else None
        logps = token_logprobs(output, batch, groups, settings, weight=weight)
        (logps * torch.linspace(-1, 2, logps.numel()).view(logps.shape)).sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in wrapped.parameters() if p.grad is not None]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_auto_backend_keeps_16_bit_logits_at_a_temperature_off_te(monkeypatch):
    """bf16 logits reach the log-prob path now: at a sampling temperature ≠ 1 'auto' scores them with the
    chunked path (fp32 scaling), not TE (16-bit logits / temperature)."""
    from unittest import mock

    from spin_megatron.algorithm import logprob

    monkeypatch.setattr(logprob, "te_cross_entropy_available", lambda: True)
    with mock.patch.object(torch.Tensor, "is_cuda", new_callable=mock.PropertyMock, return_value=True):
        bf16, fp32 = torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3)
        assert logprob._te_chosen("auto", bf16, 1.0) and logprob._te_chosen("auto", fp32, 0.7)
        assert not logprob._te_chosen("auto", bf16, 0.7) and not logprob._te_chosen("chunked", fp32, 1.0)
        assert logprob._te_chosen("te", bf16, 0.7)


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])  # untied head, tied head
def test_fused_head_uses_the_output_layer_of_an_untied_model(fixture, groups, request):
    """The fused head's weight is the output layer's: for an untied model, Megatron's
    shared_embedding_or_output_weight() on a stage with the embedding returns the input embedding instead."""
    from spin_megatron.models.builder import expose_hidden_states
    from spin_megatron.parallel.dpo_step import DPOSettings
    from spin_megatron.parallel.forward import forward_batch, head_weight, token_logprobs
    from spin_megatron.parallel.packing import IGNORE_INDEX, ScoredSequence, pack_items

    hf_dir = request.getfixturevalue(fixture)
    model, arch, _ = _load(hf_dir, groups)
    gen = torch.Generator().manual_seed(1)
    prompt, response = (
        torch.randint(0, arch.vocab_size, (12,), generator=gen),
        torch.randint(0, arch.vocab_size, (9,), generator=gen),
    )
    full = torch.cat([prompt, response])[None]
    with torch.no_grad():
        expected_all = torch.log_softmax(forward_logits(model, groups, full, arch.vocab_size)[0].float(), -1)
    positions = torch.arange(len(prompt) - 1, full.shape[1] - 1)
    expected = expected_all[positions, full[0, positions + 1]]
    expose_hidden_states(model)
    (batch,) = pack_items([[ScoredSequence(prompt.tolist(), response.tolist())]], token_budget=64)
    settings = DPOSettings(beta=0.1, vocab_size=arch.vocab_size, fused_head=True)
    with torch.no_grad():
        logps = token_logprobs(
            forward_batch(batch, model), batch, groups, settings, weight=head_weight(model)
        )
    got = logps.reshape(-1)[batch.targets.reshape(-1) != IGNORE_INDEX]
    assert (got - expected).abs().max().item() < 1e-4
