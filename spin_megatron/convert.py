"""``spin-convert``: Hugging Face ↔ Megatron-Core checkpoints for Qwen2 / Llama / Qwen3 / Qwen3-MoE models.

    spin-convert hf-to-mcore --hf-dir HF --out OUT [--tp T --pp P --ep E] [--dtype auto|fp32|bf16|fp16] [--force]
    spin-convert mcore-to-hf --mcore-dir OUT --out HF2 [--hf-config-from HF] [--tp T --pp P --ep E] [--force]
    spin-convert verify      --hf-dir HF --mcore-dir OUT [--tp T --pp P --vpp V --ep E] [--tol 1e-5]

A checkpoint is the same at every layout (its tensors carry global names): ``--vpp`` (model chunks per pipeline
stage, as ``parallel.vpp``) only changes how the processes hold the model, e.g. to check that a checkpoint loads
into the interleaved layout a run will use.

With ``--tp``/``--pp``/``--ep`` > 1 the command starts the processes the layout needs (T×P, times the
data-parallel ranks that the experts' EP × ETP grid needs) as local gloo/nccl processes itself, or runs under
``torchrun --nproc_per_node N -m spin_megatron.convert ...``. Every user mistake ends with one line on stderr
and exit code 2; nothing existing is modified unless ``--force`` is given (and then only after the new output
is complete).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from spin_megatron.errors import CheckpointError, ConfigError, OutputExistsError, UserError
from spin_megatron.models.arch import ModelArch, load_arch
from spin_megatron.models.builder import DTYPES, build_gpt_model, parse_dtype
from spin_megatron.models.hf_export import begin_output, commit_output, write_hf_checkpoint
from spin_megatron.models.hf_io import HFReader, copy_tokenizer_files
from spin_megatron.models.mapping import mapping_for
from spin_megatron.models.mcore_io import (
    arch_from_meta,
    build_model_from_checkpoint,
    checkpoint_padded_vocab,
    read_meta,
    save_model_shards,
    write_meta,
)
from spin_megatron.models.weights import check_hf_checkpoint, load_hf_weights
from spin_megatron.parallel.launch import spawn_local
from spin_megatron.parallel.schedule import forward_logits
from spin_megatron.parallel.state import destroy_parallel, init_parallel, launched_by_torchrun

PROG = "spin-convert"
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def parallel_args(p):
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel size used for the conversion")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size used for the conversion")
        p.add_argument("--vpp", type=int, default=1, help="model chunks per pipeline stage (interleaved)")
        p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
        p.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")

    p = sub.add_parser("hf-to-mcore", help="HF folder -> Megatron-Core distributed checkpoint")
    p.add_argument("--hf-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", default="auto", help="auto (the HF config's), fp32, bf16 or fp16")
    p.add_argument(
        "--force", action="store_true", help="replace a non-empty --out once the new one is complete"
    )
    parallel_args(p)

    p = sub.add_parser("mcore-to-hf", help="Megatron-Core checkpoint -> HF folder (safetensors)")
    p.add_argument("--mcore-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--hf-config-from", type=Path, help="take config.json and tokenizer files from this HF folder"
    )
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), fp32, bf16 or fp16")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 500MB, 5GB")
    p.add_argument(
        "--force", action="store_true", help="replace a non-empty --out once the new one is complete"
    )
    parallel_args(p)

    p = sub.add_parser("verify", help="compare Megatron and transformers logits on random tokens")
    p.add_argument("--hf-dir", required=True, type=Path)
    p.add_argument("--mcore-dir", required=True, type=Path)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help="max relative logit error (max|Δ| / max|logit|); default 1e-5 for fp32 checkpoints, 2e-2 otherwise",
    )
    parallel_args(p)
    return parser


# ---------------------------------------------------------------- checks done before any process group starts
def _check_output_dir(out: Path, force: bool, inputs: list[Path]) -> None:
    for src in inputs:
        if src is not None and out.resolve() == src.resolve():
            raise ConfigError(f"--out {out} is the input folder; choose a different output folder")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(
            f"output folder {out} is not empty; pass --force to replace it or choose another --out"
        )


def _resolve_dtype(name: str, default: str) -> torch.dtype:
    return parse_dtype(default if name == "auto" else name)


def _hf_default_dtype(arch: ModelArch) -> str:
    cfg = arch.hf_config
    return _HF_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), "fp32")


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not match:
        raise ConfigError(f"--max-shard-size {text!r} is not a size like 500MB or 5GB")
    return int(float(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)])


def _same_model(a: ModelArch, b: ModelArch, what: str) -> None:
    sa, sb = a.signature(), b.signature()
    diffs = [f"{k} {sa[k]} vs {sb[k]}" for k in sa if sa[k] != sb[k]]
    if diffs:
        raise CheckpointError(f"{what} describe different models: {', '.join(diffs[:4])}")


def num_processes(args) -> int:
    """TP × PP, times the data-parallel ranks the expert grid needs (EP × ETP must divide TP × DP)."""
    return args.pp * math.lcm(args.tp, args.ep * (args.etp or args.tp))


def _process_count_text(args, nprocs: int) -> str:
    text = f"--tp {args.tp} × --pp {args.pp}"
    if nprocs != args.tp * args.pp:
        text += f" × {nprocs // (args.tp * args.pp)} data-parallel (for --ep {args.ep} --etp {args.etp or args.tp})"
    return f"{text} = {nprocs}"


def _check_layout(arch: ModelArch, args) -> None:
    if args.vpp > 1 and args.pp == 1:
        raise ConfigError(
            f"--vpp {args.vpp} interleaves pipeline stages, but --pp is 1: set --pp > 1 or --vpp 1"
        )
    arch.check_parallel(
        args.tp, args.pp, "--tp", "--pp", ep=args.ep, etp=args.etp, ep_key="--ep", etp_key="--etp",
        vpp=args.vpp, vpp_key="--vpp",
    )  # fmt: skip


def preflight(args) -> None:
    """Validate arguments and inputs in the launching process, so errors print once and nothing starts."""
    if min(args.tp, args.pp, args.vpp, args.ep, args.etp or 1) < 1:
        raise ConfigError(
            f"--tp and --pp must be ≥ 1, as must --vpp, --ep and --etp (got --tp {args.tp} --pp {args.pp} "
            f"--vpp {args.vpp} --ep {args.ep} --etp {args.etp})"
        )
    if args.command == "hf-to-mcore":
        arch = load_arch(args.hf_dir)
        _check_layout(arch, args)
        _resolve_dtype(args.dtype, _hf_default_dtype(arch))
        reader = HFReader(args.hf_dir)
        check_hf_checkpoint(reader, mapping_for(arch, arch.padded_vocab_size(args.tp)))
        _check_output_dir(args.out, args.force, [args.hf_dir])
    elif args.command == "mcore-to-hf":
        meta = read_meta(args.mcore_dir)
        arch = arch_from_meta(meta)
        _check_layout(arch, args)
        checkpoint_padded_vocab(meta, args.tp)
        _resolve_dtype(args.dtype, meta["dtype"])
        _parse_size(args.max_shard_size)
        if args.hf_config_from is not None:
            _same_model(
                load_arch(args.hf_config_from),
                arch,
                f"--hf-config-from {args.hf_config_from} and --mcore-dir",
            )
        _check_output_dir(args.out, args.force, [args.mcore_dir, args.hf_config_from])
    elif args.command == "verify":
        meta = read_meta(args.mcore_dir)
        arch = arch_from_meta(meta)
        _same_model(load_arch(args.hf_dir), arch, f"--hf-dir {args.hf_dir} and --mcore-dir {args.mcore_dir}")
        HFReader(args.hf_dir)
        _check_layout(arch, args)
        checkpoint_padded_vocab(meta, args.tp)
        if args.batch_size < 1 or args.seq_len < 1:
            raise ConfigError("--batch-size and --seq-len must be ≥ 1")


def _log(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


# ---------------------------------------------------------------- the commands (run on every rank)
def hf_to_mcore(args, groups) -> int:
    arch = load_arch(args.hf_dir)
    dtype = _resolve_dtype(args.dtype, _hf_default_dtype(arch))
    padded = arch.padded_vocab_size(groups.tp_size)
    mapping = mapping_for(arch, padded)
    model = build_gpt_model(arch, groups, dtype=dtype, padded_vocab_size=padded, perform_initialization=False)
    load_hf_weights(model, HFReader(args.hf_dir), mapping, groups)
    staging = begin_output(args.out)
    save_model_shards(model, staging)
    if groups.rank == 0:
        (staging / "tokenizer").mkdir()
        copy_tokenizer_files(args.hf_dir, staging / "tokenizer")
        write_meta(staging, arch, padded, dtype, groups, source=str(args.hf_dir.resolve()))
    commit_output(staging, args.out)
    _log(
        f"wrote Megatron-Core checkpoint {args.out} ({arch.architecture}, {arch.num_layers} layers, "
        f"{DTYPES_NAME[dtype]}, written at {_layout(groups)}; loadable at any TP/PP"
        + ("/EP" if arch.moe is not None else "")
        + ")"
    )
    return 0


DTYPES_NAME = {v: k for k, v in DTYPES.items()}


def _layout(groups) -> str:
    text = f"tp={groups.tp_size} pp={groups.pp_size}"
    text += f" vpp={groups.vp_size}" if groups.vp_size > 1 else ""
    return text + (f" ep={groups.ep_size} etp={groups.etp_size}" if groups.ep_size > 1 else "")


def mcore_to_hf(args, groups) -> int:
    meta = read_meta(args.mcore_dir)
    out_dtype = _resolve_dtype(args.dtype, meta["dtype"])
    model, arch, meta = build_model_from_checkpoint(args.mcore_dir, groups, perform_initialization=False)
    config_src = args.hf_config_from
    write_hf_checkpoint(
        model,
        mapping_for(arch, int(meta["padded_vocab_size"])),
        groups,
        args.out,
        hf_config=load_arch(config_src).hf_config if config_src else arch.hf_config,
        dtype=out_dtype,
        tokenizer_src=config_src or Path(args.mcore_dir) / "tokenizer",
        max_shard_bytes=_parse_size(args.max_shard_size),
    )
    _log(
        f"wrote HF checkpoint {args.out} ({DTYPES_NAME[out_dtype]}); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})"
    )
    return 0


def verify(args, groups) -> int:
    model, arch, meta = build_model_from_checkpoint(
        args.mcore_dir, groups, dtype=torch.float32, perform_initialization=False
    )
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, arch.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    logits = forward_logits(model, groups, ids, arch.vocab_size)
    result = None
    if logits is not None and groups.tp_rank == 0:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            reference = hf_model(ids).logits
        diff = (logits.float().cpu() - reference).abs().max().item()
        result = (diff, diff / reference.abs().max().item())
    results = [None] * groups.world_size
    dist.all_gather_object(results, result)
    max_abs, max_rel = next(r for r in results if r is not None)
    tol = args.tol if args.tol is not None else (1e-5 if meta["dtype"] == "fp32" else 2e-2)
    ok = max_rel <= tol
    _log(
        f"verify {args.mcore_dir} ({_layout(groups)}) vs transformers {args.hf_dir}: "
        f"max |Δlogit| = {max_abs:.3e}, max relative = {max_rel:.3e} (tol {tol:.0e}) -> {'OK' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


COMMANDS = {"hf-to-mcore": hf_to_mcore, "mcore-to-hf": mcore_to_hf, "verify": verify}


def _run_rank(args) -> int:
    groups = init_parallel(args.tp, args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp)
    try:
        return COMMANDS[args.command](args, groups)
    finally:
        destroy_parallel()


def main(argv: list[str] | None = None) -> int:
    from spin_megatron.quiet import silence_library_noise

    silence_library_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    nprocs = num_processes(args)
    rank = int(os.environ.get("RANK", "0"))
    try:
        preflight(args)
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) != nprocs:
            raise ConfigError(
                f"started with {os.environ['WORLD_SIZE']} processes but {_process_count_text(args, nprocs)}; "
                f"use torchrun --nproc_per_node {nprocs} or matching --tp/--pp/--ep"
            )
    except UserError as exc:
        if rank == 0:  # every rank finds the same problem: report it once
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if nprocs > 1 and not launched_by_torchrun():
        return spawn_local(nprocs, "spin_megatron.convert", argv)
    try:
        return _run_rank(args)
    except UserError as exc:
        where = f" [rank {rank}]" if nprocs > 1 else ""
        print(f"{PROG}: error{where}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
