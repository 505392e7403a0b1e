"""Megatron-Core ``GPTModel`` for a Qwen2/Llama/Qwen3/Qwen3-MoE :class:`ModelArch`, built for one pipeline stage.

Layer spec: TransformerEngine's when TE imports and CUDA is present, otherwise Megatron's local spec with
:class:`SDPACoreAttention` as core attention (runs on CPU and GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spin_megatron.errors import ConfigError
from spin_megatron.models.arch import ModelArch
from spin_megatron.models.chunks import as_model, chunks_of
from spin_megatron.parallel.state import ParallelGroups

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def te_available() -> bool:
    """True when TransformerEngine's PyTorch extension imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


# fp32 with packed (THD) sequences has no TE attention backend before 2.11: the unfused backend refuses THD and
# flash/cuDNN attention need 16-bit inputs. So TE layers are used in fp32 only from TE 2.11 on.
TE_FP32_THD_FROM = (2, 11)


def te_spec_usable(dtype: torch.dtype, version: tuple[int, int] | None) -> bool:
    return version is not None and (dtype != torch.float32 or version >= TE_FP32_THD_FROM)


def default_use_te(dtype: torch.dtype) -> bool:
    """The TE spec when TE + CUDA are there and TE can attend over packed sequences in ``dtype``."""
    from spin_megatron.algorithm.logprob import te_version

    return te_available() and te_spec_usable(dtype, te_version())


def layer_spec(use_te: bool, *, qk_norm: bool = False, num_experts: int | None = None):
    """The transformer-layer ModuleSpec: TE's fused layers, or the local spec with SDPA core attention and our
    torch RMSNorm (:mod:`spin_megatron.models.norm`: Megatron's own torch-norm wrapper refuses sequence
    parallelism; block_spec takes the final norm from here). ``num_experts``: an MoE layer (TE: grouped-GEMM
    experts; local: ``SequentialMLP``, one MLP per local expert)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=num_experts is not None, qk_layernorm=qk_norm
        )
    from spin_megatron.models.sdpa_attention import SDPACoreAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, qk_layernorm=qk_norm, normalization="RMSNorm"
    )
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    _use_our_norms(spec, qk_norm)
    return spec


def _use_our_norms(spec, qk_norm: bool) -> None:
    """The local spec's norms → :class:`~spin_megatron.models.norm.RMSNorm` (sequence-parallel aware); QK-norms →
    :class:`~spin_megatron.models.norm.HeadRMSNorm`. Same forward as Megatron's torch fallback."""
    from spin_megatron.models.norm import HeadRMSNorm, RMSNorm

    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if qk_norm:
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = HeadRMSNorm


def decoder_layer_specs(arch: ModelArch, use_te: bool) -> list:
    """One spec per layer of the whole model: MoE or dense MLP as the architecture's layer pattern says."""
    dense = layer_spec(use_te, qk_norm=arch.qk_norm)
    if arch.moe is None:
        return [dense] * arch.num_layers
    moe = layer_spec(use_te, qk_norm=arch.qk_norm, num_experts=arch.moe.num_experts)
    return [moe if arch.moe.is_moe_layer(i) else dense for i in range(arch.num_layers)]


def block_spec(arch: ModelArch, config, groups: ParallelGroups, use_te: bool, vp_stage: int | None = None):
    """This pipeline stage's (model chunk's) block: its layers' specs and the final norm, given explicitly: left
    to Megatron, the local spec's final norm is apex's ``FusedLayerNorm`` whenever apex is installed without TE,
    and that rejects RMSNorm."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    specs = decoder_layer_specs(arch, use_te)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=groups.pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=groups.pp_rank)
    local = specs[offset : offset + count]
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    else:
        norm = specs[0].submodules.input_layernorm  # the layers' own RMSNorm class
    return ModuleSpec(
        module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=local, layer_norm=norm)
    )


def moe_config(arch: ModelArch, groups: ParallelGroups, *, dispatcher: str, aux_loss_coeff: float) -> dict:
    """TransformerConfig fields of the mixture-of-experts layers (none for a dense model).

    Qwen3-MoE routes with a softmax over all experts then top-k (``norm_topk_prob``: renormalised over the
    top-k, which is Megatron's top-k-then-softmax); no shared experts, no token dropping (capacity unlimited).
    """
    if arch.moe is None:
        return {}
    m = arch.moe
    return dict(
        num_moe_experts=m.num_experts,
        moe_ffn_hidden_size=m.intermediate_size,
        moe_router_topk=m.top_k,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not m.norm_topk_prob,
        moe_layer_freq=list(m.layer_pattern),
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=default_use_te_for_experts(),
        moe_permute_fusion=False,
        expert_model_parallel_size=groups.ep_size,
        expert_tensor_parallel_size=groups.etp_size,
    )


def default_use_te_for_experts() -> bool:
    """TE's grouped GEMM experts whenever the TE spec is used (TE + CUDA)."""
    return te_available()


def transformer_config(
    arch: ModelArch,
    groups: ParallelGroups,
    dtype: torch.dtype = torch.float32,
    *,
    fused_swiglu: bool = True,
    moe_dispatcher: str = "alltoall",
    moe_aux_loss_coeff: float = 0.0,
    **overrides,
):
    """Translate the architecture into a Megatron ``TransformerConfig`` (fusions off unless TE provides them).

    ``fused_swiglu``: Megatron's fused bias-SwiGLU on GPU (it goes through ``torch.compile``; turn it off where
    compiling fails or is not wanted: ``model.fused_swiglu=false``). Never on CPU. ``moe_dispatcher`` (allgather
    | alltoall) and ``moe_aux_loss_coeff`` apply to MoE models only."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch.check_parallel(
        groups.tp_size, groups.pp_size, ep=groups.ep_size, etp=groups.etp_size, vpp=groups.vp_size
    )
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        qk_layernorm=arch.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        # Megatron must be told the split sizes, otherwise every PP stage silently builds all layers.
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        # context parallel: TE's attention splits over the CP group (Megatron's default cp_comm_type, p2p); the
        # local spec's SDPACoreAttention all-gathers keys and values
        context_parallel_size=groups.cp_size,
        **interleaving_config(groups),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        attention_softmax_in_fp32=True,
        bias_activation_fusion=fused_swiglu and torch.cuda.is_available(),  # saves an activation copy
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **moe_config(arch, groups, dispatcher=moe_dispatcher, aux_loss_coeff=moe_aux_loss_coeff),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def interleaving_config(groups: ParallelGroups) -> dict:
    """TransformerConfig fields of the interleaved schedule (none without it). ``batch_p2p_comm`` off: Megatron's
    default batches each exchange's send-next/recv-prev/... into one ``batch_isend_irecv``, and at PP=2, where the
    next and the previous stage are the same peer, the interleaved schedule then pairs the wrong tensors: silently
    wrong losses and gradients (NVIDIA/Megatron-LM#750, #1450; verl turns it off too). Plain sends/receives are
    what Megatron's own training uses with interleaving (its ``overlap_p2p_comm`` default)."""
    if groups.vp_size == 1:
        return {}
    return dict(
        virtual_pipeline_model_parallel_size=groups.vp_size,
        microbatch_group_size_per_vp_stage=groups.pp_size,
        batch_p2p_comm=False,
        overlap_p2p_comm=True,
    )


def build_gpt_model(
    arch: ModelArch,
    groups: ParallelGroups,
    *,
    dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    padded_vocab_size: int | None = None,
    **config_overrides,
):
    """Build this rank's stage of the model (embedding on the first stage, output layer on the last). With
    interleaving (``groups.vp_size`` > 1): its model chunks, as one :class:`ModelChunks` sharing one config."""
    if use_te is None:
        use_te = default_use_te(dtype)
    config = transformer_config(arch, groups, dtype, **config_overrides)
    vocab = padded_vocab_size or arch.padded_vocab_size(groups.tp_size)
    if vocab % groups.tp_size or vocab < arch.vocab_size:
        raise ConfigError(
            f"padded vocab size {vocab} must be ≥ {arch.vocab_size} and divisible by tp={groups.tp_size}"
        )
    if groups.vp_size == 1:
        return _build_chunk(arch, groups, config, use_te, vocab, dtype, None)
    chunks = [_build_chunk(arch, groups, config, use_te, vocab, dtype, v) for v in range(groups.vp_size)]
    return as_model(chunks)


def _build_chunk(arch, groups, config, use_te, vocab, dtype, vp_stage):
    """One GPTModel: the whole stage (``vp_stage`` None) or model chunk ``vp_stage`` of it."""
    from megatron.core.models.gpt import GPTModel

    first_chunk = vp_stage is None or vp_stage == 0
    last_chunk = vp_stage is None or vp_stage == groups.vp_size - 1
    rope = arch.rope_scaling
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(arch, config, groups, use_te, vp_stage),
        vocab_size=vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=groups.is_first_stage and first_chunk,
        post_process=groups.is_last_stage and last_chunk,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        rope_scaling=rope is not None and rope.kind == "llama3",
        rope_scaling_factor=rope.factor if rope is not None and rope.kind == "llama3" else 8.0,
        seq_len_interpolation_factor=rope.factor if rope is not None and rope.kind == "linear" else None,
        pg_collection=groups.pgs,
        vp_stage=vp_stage,
    )
    mark_tensor_parallel_params(model)
    if dtype != torch.float32:
        # Megatron's torch-norm fallback ignores params_dtype; cast everything, as Float16Module would.
        model.to(dtype)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def mark_tensor_parallel_params(model: torch.nn.Module) -> None:
    """Tag every TP-split parameter with Megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes.

    Megatron sets them only while initialising weights (``perform_initialization=True``); when weights are
    loaded from a checkpoint instead, they are missing, and the gradient-norm / clipping code then counts the
    split parameters of TP ranks > 0 as duplicates and leaves them out — a wrong norm and wrong clipping at TP > 1.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        kind = getattr(module, "parallel_mode", None)  # TE linear wrappers
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)) or kind == "column":
            dims = {"weight": 0, "bias": 0}
        elif isinstance(module, RowParallelLinear) or kind == "row":
            dims = {"weight": 1}  # the row-parallel bias is replicated
        else:
            continue
        for name, dim in dims.items():
            param = getattr(module, name, None)
            if isinstance(param, torch.nn.Parameter) and not getattr(param, "tensor_model_parallel", False):
                set_tensor_model_parallel_attributes(param, True, dim, 1)


def expose_hidden_states(model: torch.nn.Module) -> None:
    """Make the last stage return its final hidden states ``[b, s, h]`` instead of logits.

    Used with :func:`spin_megatron.algorithm.logprob.fused_head_logprobs`, which applies the output layer's weight
    (``output_layer.weight``, or the tied embedding) chunk by chunk, so the ``[T, V/TP]`` logits never exist. The
    output layer keeps its parameter (tied or not): only its forward is bypassed (in the chunk that holds it).
    With sequence parallelism the hidden states are gathered over TP first (all tokens, as the output layer would).
    """
    for chunk in chunks_of(model):
        head = getattr(chunk, "output_layer", None)
        if head is not None:
            head.forward = _hidden_states_out(head, chunk.config.sequence_parallel)


def _hidden_states_out(head, sequence_parallel: bool):
    """The bypassed head: its input as it is; with sequence parallelism, this rank's tokens gathered over the TP
    group into all tokens (each rank's vocabulary shard scores every token). The gather's backward keeps this
    rank's tokens' gradient: the fused head already sums the gradient over the vocabulary shards (TP)."""
    if not sequence_parallel:
        return lambda input_, weight=None, runtime_gather_output=None: (input_, None)
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    def forward(input_, weight=None, runtime_gather_output=None):
        gathered = gather_from_sequence_parallel_region(
            input_, tensor_parallel_output_grad=False, group=head.tp_group
        )
        return gathered, None

    return forward
