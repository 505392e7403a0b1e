"""Benchmark: one online-DPO step, ours (``SPINTrainer.train_one_step``, TP=1) vs TRL's ``OnlineDPOTrainer``.

Needs TRL, which is *not* a dependency of the project: ``make bench-trl`` creates ``.venv-bench`` (CPU torch, this
package, ``trl``) and runs ``.venv-bench/bin/python bench/step_vs_trl.py``. Measured with TRL 1.16.0, where
``OnlineDPOTrainer`` lives in ``trl.experimental.online_dpo`` and generates with ``model.generate`` when
``use_vllm=False``: an online-vs-online comparison is possible, so the ``DPOTrainer`` fallback is not needed.

The same setup on both sides:

* the same tiny random Qwen2-shaped HF checkpoint (``make_tiny_hf_model``; default hidden 128, 2 layers, 4/2 heads),
  fp32, CPU, the same torch and transformers (one interpreter, one venv);
* the same tokenizer (``--tokenizer char``: the ~50-token character tokenizer of ``tests/synthetic_task.py``;
  ``qwen``: the real Qwen2.5 tokenizer, 151,936 rows in the output layer), the same chat-templated prompts in
  the same order (no shuffling; TRL's tokenization of each prompt is checked equal to ours), the same batch of
  ``--prompts`` prompts per step, 2 samples per prompt at temperature 1.0, ``--max-new-tokens``;
* the same reward (``tests.synthetic_task:sevens``, the fraction of "7"s), pairs = best vs worst of the 2 samples
  with ties kept and the first sample preferred (TRL's rule: ``first >= second``), so both train on exactly
  ``--prompts`` pairs a step; sigmoid DPO loss, β=0.1, the same lr (Adam, no weight decay, constant schedule),
  gradient-norm clip 1.0, a reference that is never refreshed (TRL's), no gradient checkpointing (TRL's default
  is on; turned off, as ours does not recompute), no bf16;
* equal token work: both sample exactly ``--max-new-tokens`` tokens per response (ours ignores its stop tokens,
  TRL gets ``min_new_tokens``), so every step scores 2·prompts sequences of the same lengths on both sides.

Differences in the work done, by design of each trainer (not tuned here):

* ours samples with a separate in-process transformers copy of the policy (the ``hf`` engine, our own sampling loop
  with a KV cache) and pays a **weight sync** Megatron → engine after every update; TRL samples with the training
  model itself (``model.generate``), nothing to copy;
* ours packs the sequences padding-free into one row per micro-batch (on CPU: SDPA with a dense block-diagonal
  mask over the whole row) and computes log-probs chunked over the vocabulary; TRL pads prompts (left) and
  completions (right) to the longest in the batch and materialises ``log_softmax`` of the full ``[2B, L, V]``
  logits. Both compute logits at every position, prompt positions included;
* both compute reference log-probs once per step in a no-grad forward of a frozen copy, and one policy forward +
  backward + optimizer step (ours: Megatron DDP + distributed optimizer over one rank, torch AdamW without weight
  decay; TRL: accelerate, ``adamw_torch_fused``).

A third worker, ``overlap``, is ours with ``rollout.max_staleness=1`` and the engine in a process of its own
(``rollout.hf_process=separate``, one thread): the next step's batch is generated while this one trains, so it uses
two cores (trainer + engine) where the other two use one. Its timed step includes waiting for that prefetch, so
no work is left running between steps.

Threads: each worker runs ``--threads`` torch threads (default 1, the same for both). On this 2-core machine,
shared with other jobs, 2 OpenMP threads per process made small ops stall (a [16,128]×[128,384] matmul took
0.15–2.5 ms instead of 24 µs), and much more so in TRL's process than in ours: with ``--threads 2`` TRL's step
was 2.7–15× slower than with 1 and ours barely changed, which says more about the machine than the trainers.

Each trainer lives in its own long-lived worker process, built before timing starts (start-up is not measured);
the parent tells them in turn to run one step (alternating which goes first), so the idle one only waits on a pipe.
Timed: ours ``train_one_step`` (generate + rewards + pairs → packing → reference → update → sync); TRL from
``on_step_begin`` to ``on_step_end`` (generate → policy/reference forwards → rewards → backward → clip →
optimizer). One warm-up step each, then ``--repeats`` timed steps each; medians are reported.
Usage: ``python bench/step_vs_trl.py [--prompts 8 --max-new-tokens 32 --repeats 10 --tokenizer char|qwen]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/step_vs_trl.py`: tests/ and bench/ import as packages
    sys.path.insert(0, str(REPO))

MARK = "@@bench "  # prefix of the workers' protocol lines on stdout (anything else there is ignored)
SIDES = (
    "ours",
    "overlap",
    "trl",
)  # overlap: ours with rollout.max_staleness=1, the engine in its own process


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (= pairs per step)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per trainer, after one warm-up step")
    p.add_argument("--tokenizer", choices=("char", "qwen"), default="char")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--logprob-impl",
        default="fused_head",
        choices=("fused_head", "logits"),
        help="ours: fused_head (the default: the [T, V] logits never exist; the backward recomputes them chunk by "
        "chunk) or logits (materialised, as TRL does)",
    )
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads of each worker (both alike)"
    )
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    return p.parse_args()


def _send(message: dict) -> None:
    print(MARK + json.dumps(message), flush=True)


# ------------------------------------------------------------------------------------------------ set-up
def make_setup(args, tmp: Path) -> dict:
    """The shared checkpoint, prompts and both trainers' settings, written once for both workers."""
    from transformers import AutoTokenizer

    from spin_megatron.config import shared_data_dir
    from spin_megatron.models.tiny import make_tiny_hf_model
    from tests.synthetic_task import make_char_tokenizer, make_prompt_file

    steps = 1 + args.repeats
    if args.tokenizer == "char":
        tokenizer_dir = make_char_tokenizer(tmp / "tokenizer")
    else:
        tokenizer_dir = shared_data_dir() / "qwen2.5-tokenizer"
        if not (tokenizer_dir / "vocab.json").is_file():
            raise FileNotFoundError(f"{tokenizer_dir} is missing: use --tokenizer char")
    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    model_dir = make_tiny_hf_model(
        tmp / "model",
        "qwen2",
        seed=0,
        tokenizer_dir=tokenizer_dir,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    )
    prompts = make_prompt_file(tmp / "prompts.jsonl", n=args.prompts * steps)
    overrides = [
        f"model.hf_path={model_dir}",
        f"data.train_files=[{prompts}]",
        f"data.val_files=[{prompts}]",
        "data.use_chat_template=true",
        "data.instruction=''",
        "data.shuffle=false",
        "algorithm.mode=online",
        "algorithm.reward=tests.synthetic_task:sevens",
        "algorithm.tie_policy=keep",
        "algorithm.tie_break=first",
        "algorithm.loss_type=sigmoid",
        f"algorithm.beta={args.beta}",
        "rollout.engine=hf",
        "rollout.n=2",
        "rollout.temperature=1.0",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"optim.lr={args.lr}",
        "optim.clip_grad=1.0",
        f"trainer.prompts_per_step={args.prompts}",
        "trainer.total_steps=1000",
        "trainer.ref_update_freq=0",
        "trainer.test_freq=0",
        "trainer.save_freq=0",
        "trainer.export_hf=false",
        f"trainer.seed={args.seed}",
        f"trainer.output_dir={tmp / 'ours'}",
        "logging.progress_bar=false",
        f"trainer.logprob_impl={args.logprob_impl}",
    ]
    overlap = [o for o in overrides if not o.startswith("trainer.output_dir=")]
    overlap += [f"trainer.output_dir={tmp / 'overlap'}", "rollout.hf_process=separate", "rollout.hf_threads=1",
                "rollout.max_staleness=1"]  # fmt: skip
    return {
        "overrides": overrides,
        "overlap_overrides": overlap,
        "model_dir": str(model_dir),
        "out_dir": str(tmp / "trl"),
        "steps": steps,
        **{k: getattr(args, k) for k in ("prompts", "max_new_tokens", "lr", "beta", "seed")},
    }


# ------------------------------------------------------------------------------------------------ ours
def ours_worker(setup: dict, overlap: bool = False) -> None:
    import torch

    import spin_megatron.training.trainer as trainer_module
    from spin_megatron.parallel.state import destroy_parallel, init_parallel
    from spin_megatron.train import load_config, preflight, prepare_data
    from spin_megatron.training.trainer import SPINTrainer

    probe = {}
    pack_items = trainer_module.pack_items

    def counting_pack_items(*a, **k):  # measurement only: positions the packed micro-batches hold
        batches = pack_items(*a, **k)
        probe["computed_tokens"] = sum(b.input_ids.numel() for b in batches)
        return batches

    trainer_module.pack_items = counting_pack_items

    cfg = load_config(setup["overlap_overrides" if overlap else "overrides"])
    preflight(cfg, 1)
    data = prepare_data(cfg)
    groups = init_parallel(1, 1, seed=cfg.trainer.seed)
    trainer = SPINTrainer(cfg, groups, data)
    trainer.stop_ids = ()  # every response runs to max_new_tokens: the same token work as TRL's min_new_tokens
    while True:
        _send({"event": "ready", "threads": torch.get_num_threads()})
        if sys.stdin.readline().strip() != "step":
            break
        trainer.step += 1
        start = time.perf_counter()
        metrics = trainer.train_one_step()
        seconds = time.perf_counter() - start
        phases = {k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")}
        _send(
            {
                "event": "step",
                "seconds": seconds,
                "pairs": metrics["pairs/kept"],
                "tokens": metrics["train/tokens"],
                "computed_tokens": probe["computed_tokens"],
                **phases,
            }
        )
    trainer.logger.finish()
    destroy_parallel()


# ------------------------------------------------------------------------------------------------ TRL
def trl_worker(setup: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from spin_megatron.algorithm.experience import stop_token_ids
    from spin_megatron.train import load_config, prepare_data
    from tests.synthetic_task import sevens

    examples = prepare_data(load_config(setup["overrides"])).train  # our prompts, in our (unshuffled) order
    tokenizer = AutoTokenizer.from_pretrained(setup["model_dir"])
    texts = [tokenizer.decode(ex.prompt_ids) for ex in examples]
    for ex, text in zip(examples, texts):
        if tokenizer(text, add_special_tokens=False)["input_ids"] != list(ex.prompt_ids):
            raise RuntimeError(f"TRL would tokenize prompt {ex.prompt_id} differently: {text!r}")
    model = AutoModelForCausalLM.from_pretrained(setup["model_dir"], dtype=torch.float32)
    model.generation_config.eos_token_id = list(stop_token_ids(tokenizer))  # our stop set

    def sevens_reward(prompts, completions, **kwargs):
        return [sevens(p, c, {}) for p, c in zip(prompts, completions)]

    config = OnlineDPOConfig(
        output_dir=setup["out_dir"],
        per_device_train_batch_size=setup["prompts"],
        gradient_accumulation_steps=1,
        max_steps=setup["steps"] + 1,  # one more than run: the loop then always waits at the gate
        learning_rate=setup["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=setup["beta"],
        loss_type="sigmoid",
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=setup["max_new_tokens"],
        max_length=4096,
        generation_kwargs={"min_new_tokens": setup["max_new_tokens"]},
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        seed=setup["seed"],
        train_sampling_strategy="sequential",
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,  # TRL's per-step stats are still computed in training_step; printing is skipped
        disable_tqdm=True,
    )
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=sevens_reward,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
        processing_class=tokenizer,
    )
    probe = _instrument(trainer)

    class StepGate(TrainerCallback):
        """Blocks each step until the parent says go; reports the step's wall time and work."""

        def on_step_begin(self, args, state, control, **kwargs):
            _send({"event": "ready", "threads": torch.get_num_threads()})
            if sys.stdin.readline().strip() != "step":
                raise SystemExit(0)
            probe.clear()
            probe["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - probe.pop("start")
            _send({"event": "step", "seconds": seconds, **probe})

    trainer.add_callback(StepGate())
    trainer.train()


def _instrument(trainer) -> dict:
    """Wrap TRL's ``_generate`` / ``_forward`` to time them and count tokens (measurement only)."""
    probe: dict = {}
    generate, forward = trainer._generate, trainer._forward

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        prompt_ids, prompt_mask, completion_ids, completion_mask = out[:4]
        probe["generate"] = time.perf_counter() - start
        probe["pairs"] = prompt_ids.shape[0] // 2
        probe["tokens"] = int(prompt_mask.sum() + completion_mask.sum())
        probe["computed_tokens"] = prompt_ids.shape[0] * (prompt_ids.shape[1] + completion_ids.shape[1])
        return out

    def timed_forward(model, *a, **k):
        start = time.perf_counter()
        out = forward(model, *a, **k)
        if model is trainer.ref_model:
            probe["ref"] = probe.get("ref", 0.0) + time.perf_counter() - start
        return out

    trainer._generate, trainer._forward = timed_generate, timed_forward
    return probe


# ------------------------------------------------------------------------------------------------ parent
class Worker:
    def __init__(self, side: str, setup_path: Path, log_path: Path, threads: int):
        self.side, self.log_path = side, log_path
        self._log = open(log_path, "w")  # closed in close()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--setup", str(setup_path)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRL_EXPERIMENTAL_SILENCE": "1"}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO, env=env
        )

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.proc.wait()
        tail = self.log_path.read_text()[-3000:]
        raise RuntimeError(f"{self.side} worker exited with {self.proc.returncode}:\n{tail}")

    def step(self) -> dict:
        """One step; returns once the worker waits for the next command (no work left over)."""
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        result = self.receive()
        self.expect_ready()
        return result

    def expect_ready(self) -> None:
        message = self.receive()
        if message["event"] != "ready":
            raise RuntimeError(f"{self.side} worker: protocol error (expected ready)")
        self.threads = message["threads"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def run(args) -> tuple[dict[str, list[dict]], dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        setup = make_setup(args, tmp)
        setup_path = tmp / "setup.json"
        setup_path.write_text(json.dumps(setup))
        workers = {}
        try:
            for side in SIDES:  # one at a time: start-up must not overlap the other's steps
                workers[side] = Worker(side, setup_path, tmp / f"{side}.log", args.threads)
                workers[side].expect_ready()
            for side in SIDES:
                workers[side].step()  # warm-up
            results = {side: [] for side in SIDES}
            for i in range(args.repeats):
                for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                    results[side].append(workers[side].step())
        finally:
            for worker in workers.values():
                worker.close()
        return results, {side: w.threads for side, w in workers.items()}


def report(args, results: dict[str, list[dict]], threads: dict[str, int]) -> None:
    import torch
    import transformers
    import trl

    def med(side, key):
        values = [r[key] for r in results[side] if key in r]
        return statistics.median(values) if values else float("nan")

    print(
        f"online DPO step, TRL {trl.__version__} OnlineDPOTrainer vs ours (SPINTrainer, TP=1), torch "
        f"{torch.__version__}, transformers {transformers.__version__}, CPU fp32, torch threads per worker "
        + ", ".join(f"{side} {n}" for side, n in threads.items())
        + " (overlap: plus its engine process, 1 thread: 2 cores in all; ours and trl: 1 core)"
    )
    print(
        f"tiny Qwen2 hidden {args.hidden} × {args.layers} layers, {args.tokenizer} tokenizer, {args.prompts} "
        f"prompts × 2 samples × {args.max_new_tokens} new tokens, median of {args.repeats} steps after 1 warm-up, "
        "alternating"
    )
    head = f"{'trainer':<8} {'s/step':>7} {'generate':>9} {'ref':>6} {'update':>7} {'sync':>6}"
    print(f"{head} {'pairs':>6} {'tokens':>7} {'computed':>9} {'pairs/s':>8} {'tokens/s':>9} {'× TRL':>6}")
    trl_rate = med("trl", "pairs") / med("trl", "seconds")
    for side in SIDES:
        seconds, pairs = med(side, "seconds"), med(side, "pairs")
        if side == "trl":  # TRL's "update": policy forward + rewards + backward + optimizer (the rest)
            generate, ref = med(side, "generate"), med(side, "ref")
            update, sync = seconds - generate - ref, 0.0
        else:
            generate, ref, update, sync = (med(side, k) for k in ("generate", "ref", "update", "sync"))
        tokens = med(side, "tokens")
        print(
            f"{side:<8} {seconds:7.3f} {generate:9.3f} {ref:6.3f} {update:7.3f} {sync:6.3f} {pairs:6.0f} "
            f"{tokens:7.0f} {med(side, 'computed_tokens'):9.0f} {pairs / seconds:8.2f} {tokens / seconds:9.0f} "
            f"{pairs / seconds / trl_rate:6.2f}"
        )
    ratio = (med("ours", "pairs") / med("ours", "seconds")) / trl_rate
    print(
        "tokens = prompt+response tokens of the scored sequences; computed = positions the forward passes run "
        "(TRL pads to the batch's longest; ours packs). TRL's ref/update split: 'update' is everything but "
        "generate and the reference forward; it has no weight sync (it samples with the training model)."
    )
    print(f"ours / TRL pairs/s: {ratio:.2f}× (target ≥ 1.5×: {'met' if ratio >= 1.5 else 'NOT met'})")
    overlap = (med("overlap", "pairs") / med("overlap", "seconds")) / trl_rate
    print(
        f"ours overlapped / TRL pairs/s: {overlap:.2f}× (target ≥ 2×: {'met' if overlap >= 2 else 'NOT met'})"
    )


def main() -> int:
    args = _parse()
    if args.worker:
        setup = json.loads(Path(args.setup).read_text())
        if args.worker == "trl":
            trl_worker(setup)
        else:
            ours_worker(setup, overlap=args.worker == "overlap")
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("error: TRL is not installed in this environment; run `make bench-trl`", file=sys.stderr)
        return 2
    report(args, *run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
