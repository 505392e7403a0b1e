"""Per-token log-probabilities from vocab-parallel logits, never gathering the full vocabulary.

Each TP rank holds the columns ``[r·V/TP, (r+1)·V/TP)`` of the logits (Megatron's ``ColumnParallelLinear`` output
layer). Three ways to get ``log softmax(logits / temperature)[target]``:

* :func:`vocab_parallel_logprobs` with ``backend="te"`` — TransformerEngine's ``parallel_cross_entropy`` (GPU);
* the same with ``backend="chunked"`` — our autograd function: fp32 over chunks of tokens, the max and the
  sum-exp reduced across the TP group, so the extra memory is one ``[chunk, V/TP]`` fp32 buffer;
* :func:`fused_head_logprobs` — from the last hidden states and the output-layer weight shard straight to
  log-probs, chunked over tokens in forward *and* backward, so the ``[T, V/TP]`` logits never exist at once.

Padded vocabulary rows (Megatron pads the embedding to a multiple of 128·…) are excluded when ``vocab_size`` is
given, so the result equals ``log_softmax`` over the real vocabulary (what HF and the rollout engine compute).
Sampled responses must be scored at the sampling ``temperature``. Positions whose target is ``ignore_index``
(prompt, padding) get log-prob 0 and no gradient.

``stats=`` asks for detached per-token statistics over the real vocabulary (:data:`TOKEN_STATS`), for metrics and
WPO weights; the chunked and fused paths compute them inside their forward chunk loop, from the chunk's logits.

One file (a little over 400 lines) on purpose: the chunked and the fused path share the chunk loop's maths (the
TP-reduced max and sum-exp, the padded-vocabulary mask, the statistics), and their forward and backward are read
side by side when checking one against the other.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

BACKENDS = ("auto", "te", "chunked")
# entropy and log Σ p² of softmax(logits / temperature); mean of the raw logits; 1.0 where the target's logit is
# the maximum (ties count); all over the real vocabulary, 0 at ignored positions
TOKEN_STATS = ("entropy", "mean_logit", "is_top1", "log_sum_sq_probs")


# TE's parallel_cross_entropy: added in 2.2, ignore_idx in 2.4; before 2.8 its backward scales every row by
# grad_output[0] (a per-row gradient, as DPO needs, comes out wrong): 2.8 is the floor for this path. Up to 2.18
# the forward writes the gradient into its input; from 2.19 it keeps the input unless asked to overwrite it.
TE_CROSS_ENTROPY_MIN = (2, 8)
TE_KEEPS_INPUT_FROM = (2, 19)


@functools.lru_cache(maxsize=1)
def te_version() -> tuple[int, int] | None:
    """(major, minor) of the installed TransformerEngine, or None when it is absent. Read once per process: the
    TE path asks on every call."""
    from importlib import metadata

    names = {"transformer-engine", "transformer-engine-torch"}
    for package in metadata.distributions():
        if (package.metadata["Name"] or "").lower().replace("_", "-") in names:
            return parse_version(package.version)
    return None


def parse_version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def te_cross_entropy_usable(version: tuple[int, int] | None) -> bool:
    """The TE log-prob path needs TE ≥ 2.8 (per-row gradients right)."""
    return version is not None and version >= TE_CROSS_ENTROPY_MIN


def te_overwrites_input(version: tuple[int, int] | None) -> bool:
    return version is None or version < TE_KEEPS_INPUT_FROM


def te_cross_entropy_available() -> bool:
    """CUDA, TE's parallel_cross_entropy importable, and a TE recent enough for per-row DPO gradients."""
    if not torch.cuda.is_available():
        return False
    try:
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return te_cross_entropy_usable(te_version())


class _VocabShard:
    """Where this rank's columns sit in the vocabulary, and which targets fall into them."""

    def __init__(
        self, local_vocab: int, group, vocab_size: int | None, target: torch.Tensor, ignore_index: int
    ):
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        rank = dist.get_rank(group) if self.group is not None else 0
        self.start = rank * local_vocab
        total = local_vocab * (dist.get_world_size(group) if self.group is not None else 1)
        vocab_size = total if vocab_size is None else vocab_size
        if not 0 < vocab_size <= total:
            raise ValueError(f"vocab_size {vocab_size} must be in (0, {total}] (the sharded logits' width)")
        self.vocab_size = vocab_size
        # real (non-padding) columns held here
        self.columns = max(0, min(local_vocab, vocab_size - self.start))
        self.valid = target != ignore_index
        local = target - self.start
        self.in_shard = self.valid & (local >= 0) & (local < self.columns)
        self.local_target = torch.where(self.in_shard, local, torch.zeros_like(local))

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor


def _chunk_logsumexp_and_target(z: torch.Tensor, shard: _VocabShard, rows: slice):
    """For fp32 scaled logits ``z`` [c, V/TP] of real columns: global max, logsumexp and target logit per row."""
    if z.shape[1]:
        local_max = z.max(dim=-1).values
    else:  # every column of this shard is padding
        local_max = torch.full((z.shape[0],), float("-inf"), device=z.device)
    global_max = shard.all_reduce(local_max.clone(), dist.ReduceOp.MAX)
    sum_exp = (z - global_max[:, None]).exp_().sum(dim=-1) if z.shape[1] else torch.zeros_like(global_max)
    if z.shape[1]:
        picked = z.gather(1, shard.local_target[rows, None]).squeeze(1)
    else:
        picked = torch.zeros_like(global_max)
    target_logit = torch.where(shard.in_shard[rows], picked, torch.zeros_like(picked))
    reduced = shard.all_reduce(torch.stack([sum_exp, target_logit]))
    return global_max, global_max + reduced[0].log(), reduced[1]


class _TokenStats:
    """The requested :data:`TOKEN_STATS`, filled chunk by chunk in a forward loop (autograd is off there)."""

    def __init__(self, names: tuple[str, ...], target: torch.Tensor, ignore_index: int):
        self.valid, self.shape = target.reshape(-1) != ignore_index, target.shape
        self.values = {name: torch.zeros(self.valid.shape, device=target.device) for name in names}

    def add_chunk(self, z, global_max, lse, target_logit, shard: _VocabShard, rows: slice, temperature):
        """From one chunk's fp32 scaled logits ``z`` and the rows' reduced max, logsumexp and target logit."""
        if "is_top1" in self.values:
            # exact: the rank holding the maximum contributes that very element to both sides
            self.values["is_top1"][rows] = (target_logit >= global_max).float()
        sums = {}
        if "mean_logit" in self.values:
            sums["mean_logit"] = z.sum(dim=-1).mul_(temperature / shard.vocab_size)
        if "entropy" in self.values or "log_sum_sq_probs" in self.values:
            surprise = z.neg().add_(lse[:, None])  # −log p ≥ 0: the entropy's terms never cancel
            prob = surprise.neg().exp_()
            if "entropy" in self.values:
                sums["entropy"] = surprise.mul_(prob).sum(dim=-1)
            if "log_sum_sq_probs" in self.values:
                sums["log_sum_sq_probs"] = prob.mul_(prob).sum(dim=-1)
        if sums:
            reduced = shard.all_reduce(torch.stack(list(sums.values())))
            for name, total in zip(sums, reduced):
                self.values[name][rows] = total.log() if name == "log_sum_sq_probs" else total

    def result(self) -> dict[str, torch.Tensor]:
        return {
            name: torch.where(self.valid, value, torch.zeros_like(value)).view(self.shape)
            for name, value in self.values.items()
        }


def _token_stats(stats: tuple[str, ...], target: torch.Tensor, ignore_index: int) -> _TokenStats | None:
    if isinstance(stats, str) or any(name not in TOKEN_STATS for name in stats):
        raise ValueError(f"stats must be a tuple of names from {TOKEN_STATS}, got {stats!r}")
    return _TokenStats(tuple(dict.fromkeys(stats)), target, ignore_index) if stats else None


def _forward_chunks(chunk_logits, tokens: int, chunk: int, shard: _VocabShard, temperature: float, stats):
    """The forward loop of both paths: ``chunk_logits(rows)`` gives a fresh fp32 ``[c, columns]`` buffer of scaled
    logits. Returns the logsumexp (kept for backward) and the log-probs, 0 at ignored positions."""
    lse = torch.empty(tokens, dtype=torch.float32, device=shard.valid.device)
    logp = torch.zeros_like(lse)
    for start in range(0, tokens, chunk):
        rows = slice(start, start + chunk)
        z = chunk_logits(rows)
        global_max, lse[rows], target_logit = _chunk_logsumexp_and_target(z, shard, rows)
        logp[rows] = target_logit - lse[rows]
        if stats is not None:
            stats.add_chunk(z, global_max, lse[rows], target_logit, shard, rows, temperature)
    return lse, torch.where(shard.valid, logp, torch.zeros_like(logp))


def _chunked_forward(logits, target, group, temperature, ignore_index, vocab_size, chunk, stats):
    width = logits.shape[-1]
    flat, flat_target = logits.reshape(-1, width), target.reshape(-1)
    shard = _VocabShard(width, group, vocab_size, flat_target, ignore_index)

    def scaled_rows(rows):
        return _scaled(flat[rows, : shard.columns], temperature)

    lse, logp = _forward_chunks(scaled_rows, flat.shape[0], chunk, shard, temperature, stats)
    return shard, lse, logp.view(target.shape)


@torch.no_grad()
def _token_stats_pass(logits, target, group, temperature, ignore_index, vocab_size, chunk, stats):
    """The TE backend's statistics (TE gives only the log-probs): the chunked forward once more, without autograd."""
    _chunked_forward(logits, target, group, temperature, ignore_index, vocab_size, chunk, stats)
    return stats.result()


def _grad_of_logits(
    z: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    shard: _VocabShard,
    rows: slice,
    width: int,
    temperature: float,
) -> torch.Tensor:
    """d(Σ g·logp)/d(logits) for one chunk: g·(onehot − softmax)/temperature, zero on padded columns.

    Works in place on ``z`` (a fresh fp32 buffer); a wider zeroed buffer is needed only when this shard holds
    padded columns.
    """
    grad = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    hit = shard.in_shard[rows]
    grad[hit, shard.local_target[rows][hit]] += g[hit]
    if temperature != 1.0:
        grad.div_(temperature)
    if grad.shape[1] < width:
        padded = torch.zeros(grad.shape[0], width, dtype=grad.dtype, device=grad.device)
        padded[:, : grad.shape[1]] = grad
        grad = padded
    return grad


class _ChunkedVocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, temperature, ignore_index, vocab_size, chunk, stats):
        shard, lse, logp = _chunked_forward(
            logits, target, group, temperature, ignore_index, vocab_size, chunk, stats
        )
        ctx.save_for_backward(logits, lse)
        ctx.shard, ctx.temperature, ctx.chunk = shard, temperature, chunk
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, lse = ctx.saved_tensors
        shard, width = ctx.shard, logits.shape[-1]
        flat = logits.reshape(-1, width)
        g = torch.where(shard.valid, grad_logp.reshape(-1).float(), torch.zeros_like(lse))
        grad = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            z = _scaled(flat[rows, : shard.columns], ctx.temperature)
            grad[rows] = _grad_of_logits(z, lse[rows], g[rows], shard, rows, width, ctx.temperature)
        return grad.view(logits.shape), None, None, None, None, None, None, None


def _scaled(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh fp32 copy of ``chunk / temperature`` (safe to modify in place)."""
    z = chunk.to(torch.float32, copy=True)
    return z.div_(temperature) if temperature != 1.0 else z


def _te_logprobs(logits, target, group, temperature, ignore_index, vocab_size):
    from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

    x = logits / temperature if temperature != 1.0 else logits
    shard = _VocabShard(x.shape[-1], group, vocab_size, target, ignore_index)
    if shard.columns < x.shape[-1]:
        pad = torch.arange(x.shape[-1], device=x.device) >= shard.columns
        x = x.masked_fill(pad, float("-inf"))
    if x is logits and te_overwrites_input(te_version()):
        x = logits.clone()  # TE < 2.19 writes the gradient into its input: the logits must survive it
    # positional: (input, target, label_smoothing, reduce_loss, dist_process_group, ignore_idx)
    return -parallel_cross_entropy(x, target, 0.0, False, shard.group, ignore_index)


def _te_chosen(backend: str, logits: torch.Tensor, temperature: float) -> bool:
    """Whether TE computes the log-probs. ``backend="auto"``: on CUDA when TE is usable, except for 16-bit logits at
    a temperature ≠ 1 (TE would get ``logits / temperature`` rounded to 16 bits; chunked scales in fp32: exact)."""
    if backend != "auto":
        return backend == "te"
    exact_scale = temperature == 1.0 or logits.dtype == torch.float32
    return logits.is_cuda and exact_scale and te_cross_entropy_available()


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    chunk_tokens: int = 1024,
    backend: str = "auto",
    stats: tuple[str, ...] = (),
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``log softmax(logits/temperature)[target]`` per token (fp32, shape of ``target``) from ``[..., V/TP]`` logits.

    ``backend``: "auto" (TE on CUDA when installed, except for 16-bit logits at a temperature ≠ 1; else
    chunked), "te" or "chunked". With ``stats`` (names from
    :data:`TOKEN_STATS`) returns ``(logps, {name: detached fp32 tensor shaped like logps})``; the TE backend then
    makes one extra no-grad chunked pass over the logits for them.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score samples, got {temperature}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree")
    if backend == "te" and not te_cross_entropy_usable(te_version()):
        found = te_version()
        raise ValueError(
            f"backend='te' needs TransformerEngine ≥ {'.'.join(map(str, TE_CROSS_ENTROPY_MIN))} (earlier "
            "parallel_cross_entropy backward scales every row by the first row's gradient); found "
            f"{'none' if found is None else '.'.join(map(str, found))}: upgrade TE or use backend='chunked'"
        )
    token_stats = _token_stats(stats, target, ignore_index)
    chunk = max(1, chunk_tokens)
    if _te_chosen(backend, logits, temperature):
        logp = _te_logprobs(logits, target, tp_group, temperature, ignore_index, vocab_size).float()
        if token_stats is None:
            return logp
        args = (logits, target, tp_group, float(temperature), ignore_index, vocab_size, chunk)
        return logp, _token_stats_pass(*args, token_stats)
    logp = _ChunkedVocabParallelLogProb.apply(
        logits, target, tp_group, float(temperature), ignore_index, vocab_size, chunk, token_stats
    )
    return logp if token_stats is None else (logp, token_stats.result())


class _FusedHeadLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, group, temperature, ignore_index, vocab_size, chunk, stats):
        flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
        shard = _VocabShard(weight.shape[0], group, vocab_size, flat_t, ignore_index)
        real_weight = weight[: shard.columns]

        def head_rows(rows):
            return _head_chunk(flat_h[rows], real_weight, temperature)

        lse, logp = _forward_chunks(head_rows, flat_h.shape[0], chunk, shard, temperature, stats)
        ctx.save_for_backward(hidden, weight, lse)
        ctx.shard, ctx.temperature, ctx.chunk, ctx.target_shape = shard, temperature, chunk, target.shape
        return logp.view(target.shape)

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, lse = ctx.saved_tensors
        shard, temperature = ctx.shard, ctx.temperature
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        real_weight = weight[: shard.columns]
        g = torch.where(shard.valid, grad_logp.reshape(-1).float(), torch.zeros_like(lse))
        grad_h = torch.empty(flat_h.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, flat_h.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            z = _head_chunk(flat_h[rows], real_weight, temperature)
            grad_z = _grad_of_logits(z, lse[rows], g[rows], shard, rows, shard.columns, temperature)
            grad_h[rows] = grad_z.to(weight.dtype) @ real_weight
            grad_w[: shard.columns] += grad_z.t().to(weight.dtype) @ flat_h[rows].to(weight.dtype)
        # hidden is replicated over TP ranks, each saw only its vocabulary slice: sum the partial gradients
        # (what ColumnParallelLinear's copy_to_tensor_model_parallel_region does in backward).
        shard.all_reduce(grad_h)
        return (
            grad_h.to(hidden.dtype).view(hidden.shape),
            grad_w.to(weight.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _head_chunk(hidden_rows: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    z = (hidden_rows.to(weight.dtype) @ weight.t()).float()
    return z.div_(temperature) if temperature != 1.0 else z


def fused_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    chunk_tokens: int = 1024,
    stats: tuple[str, ...] = (),
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs of ``target`` under ``softmax(hidden @ weightᵀ / temperature)`` without materialising the logits.

    ``hidden`` [..., H] is the output layer's input (replicated across the TP group; no sequence parallelism),
    ``weight`` [V/TP, H] this rank's shard of the output layer (or the tied embedding). Peak extra memory is one
    ``[chunk_tokens, V/TP]`` fp32 buffer (three with ``stats``) plus the weight gradient. With ``stats`` (names from
    :data:`TOKEN_STATS`) returns ``(logps, {name: detached fp32 tensor shaped like logps})``, computed in the same
    forward chunk loop.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score samples, got {temperature}")
    if hidden.shape[:-1] != target.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and target {tuple(target.shape)} disagree"
        )
    token_stats = _token_stats(stats, target, ignore_index)
    args = (
        hidden,
        weight,
        target,
        tp_group,
        float(temperature),
        ignore_index,
        vocab_size,
        max(1, chunk_tokens),
    )
    logp = _FusedHeadLogProb.apply(*args, token_stats)
    return logp if token_stats is None else (logp, token_stats.result())
