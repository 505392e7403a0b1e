"""The ``hf`` rollout engine: a transformers model in the trainer's process (the CPU default).

Placement: one engine per model-parallel group, on its first rank (TP rank 0 of pipeline stage 0) — the same
topology as one SGLang engine per data-parallel replica. Weight sync streams the Megatron weights into it as
HF-named tensors.

Sampling is our own batched loop over transformers' KV cache rather than ``model.generate`` so that it is
deterministic under a seed (a private ``torch.Generator``, independent of the global RNG) and returns, for every
sampled token, ``log softmax(logits / temperature)[token]`` — the value the trainer recomputes (no top-k/top-p
renormalisation, as SGLang reports it). Greedy decoding is ``temperature=0`` (log-probs then at temperature 1).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Hashable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.types import Sample


class HFEngine:
    def __init__(
        self,
        model,
        *,
        pad_token_id: int = 0,
        max_batch_size: int = 64,
        seed: int = 0,
        show_progress: bool = False,
    ):
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.seed = seed
        self.show_progress = show_progress
        self._calls = 0
        self._params = dict(model.named_parameters())
        # transformers ≥ 5.2x calls the KV cache `cache` (input and output); earlier versions `past_key_values`
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        # the prefill needs the logits of the last position only (saves a [prompt, vocab] matmul per prompt)
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path, *, dtype=torch.float32, **kwargs) -> HFEngine:
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype), **kwargs)

    @classmethod
    def from_config(cls, hf_config: dict, *, dtype=torch.float32, **kwargs) -> HFEngine:
        """An engine with random weights of the right shapes; the first weight sync fills them."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = dict(hf_config)
        model_type = config.pop("model_type")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=dtype)
        return cls(model, **kwargs)

    # ----- weights -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named_tensors:
            param = self._params.get(name)
            if param is None:
                param = fused_expert_slice(self._params, name)
            if param is None:
                raise KeyError(f"hf engine: the model has no parameter {name!r}")
            if param.shape != tensor.shape:
                raise ValueError(
                    f"hf engine: {name} has shape {tuple(param.shape)}, got {tuple(tensor.shape)}"
                )
            param.copy_(tensor)

    def finish_weight_update(self) -> None:
        pass  # no cache to flush: every generate starts from empty KV caches

    def sleep(self, *, release_weights: bool = True) -> None:
        pass  # in-process on CPU: nothing to release

    def wake(self) -> None:
        pass

    def shutdown(self) -> None:
        self.model = None
        self._params = {}

    # ----- generation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, prompt_keys: list[Hashable] | None = None
    ) -> list[Sample]:
        if prompt_keys is not None and len(prompt_keys) != len(prompt_ids):
            raise ValueError(f"{len(prompt_keys)} prompt_keys for {len(prompt_ids)} prompts")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("hf engine: empty prompt (no tokens)")
        keys = list(range(len(prompt_ids))) if prompt_keys is None else list(prompt_keys)
        seed = params.seed if params.seed is not None else self.seed + self._calls
        self._calls += 1
        generator = torch.Generator(device=self._device).manual_seed(seed)
        jobs = [(keys[i], list(p), k) for i, p in enumerate(prompt_ids) for k in range(params.n)]
        samples = []
        for start in range(0, len(jobs), self.max_batch_size):
            batch = jobs[start : start + self.max_batch_size]
            outputs = self._sample_batch([job[1] for job in batch], params, generator)
            for (key, prompt, index), (tokens, logps, reason) in zip(batch, outputs):
                samples.append(
                    Sample(
                        prompt_id=key,
                        prompt_ids=prompt,
                        response_ids=tokens,
                        logprobs=logps,
                        finish_reason=reason,
                        sample_index=index,
                    )
                )
        return samples

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _sample_batch(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator):
        """Left-padded batched decoding with a KV cache; returns (tokens, log-probs, finish reason) per row."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        device = self._device
        ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((batch, width), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **self._last_logits_only,
        )
        stop = set(params.stop_token_ids)
        tokens = [[] for _ in range(batch)]
        logps = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        steps = tqdm(
            range(params.max_new_tokens), desc="generate", leave=False, disable=not self.show_progress
        )
        for _ in steps:
            token, logp = sample_next_token(out.logits[:, -1], params, generator)
            for row in torch.nonzero(~done).flatten().tolist():
                tokens[row].append(int(token[row]))
                logps[row].append(float(logp[row]))
                if int(token[row]) in stop:
                    done[row] = True
                    reasons[row] = "stop"
            if bool(done.all()):
                break
            token = torch.where(done, torch.full_like(token, self.pad_token_id), token)
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            positions = positions[:, -1:] + 1
            cache = {self._cache_arg: getattr(out, self._cache_arg)}
            out = self.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True, **cache
            )
        return list(zip(tokens, logps, reasons))


_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fused_expert_slice(params: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The view of a fused expert parameter that an on-disk per-expert tensor fills, or None.

    transformers 5 saves Qwen3-MoE experts one by one (``mlp.experts.<g>.gate_proj|up_proj|down_proj.weight``)
    but holds them fused in memory: ``mlp.experts.gate_up_proj [E, 2I, H]`` (expert g's gate rows first, then its
    up rows) and ``mlp.experts.down_proj [E, H, I]``."""
    match = _PER_EXPERT.match(name)
    if match is None:
        return None
    prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
    fused = params.get(f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}")
    if fused is None or fused.dim() != 3 or expert >= fused.shape[0]:
        return None
    if proj == "down_proj":
        return fused[expert]
    gate, up = fused[expert].chunk(2, dim=0)
    return gate if proj == "gate_proj" else up


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator):
    """Next token per row and its log-prob under ``softmax(logits / temperature)`` (greedy: temperature 0)."""
    logits = logits.float()
    if params.temperature == 0:
        token = logits.argmax(dim=-1)
        return token, torch.log_softmax(logits, -1).gather(1, token[:, None]).squeeze(1)
    scaled = logits / params.temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    filtered = scaled
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = filtered.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    probs = (
        log_probs.exp() if filtered is scaled else filtered.softmax(-1)
    )  # no filter: reuse the log-softmax
    token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return token, log_probs.gather(1, token[:, None]).squeeze(1)
