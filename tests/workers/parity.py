"""Rank worker for test_dist_parity: load HF checkpoints into the Megatron model at --tp/--pp (or at each
``--layout tp.pp.ep.etp``, one after another in the same processes), compare logits with transformers and the
streamed HF export with the original tensors; rank 0 writes a JSON report."""

import argparse
import json
import sys

import torch
import torch.distributed as dist

from spin_megatron.models import build_gpt_model, load_arch
from spin_megatron.models.chunks import chunks_of
from spin_megatron.models.hf_io import HFReader
from spin_megatron.models.mapping import mapping_for
from spin_megatron.models.weights import load_hf_weights
from spin_megatron.parallel import destroy_parallel, init_parallel
from spin_megatron.parallel.schedule import forward_logits
from spin_megatron.parallel.weight_export import export_hf_weights


def check_model(hf_dir, groups, **build_kwargs):
    arch = load_arch(hf_dir)
    mapping = mapping_for(arch, arch.padded_vocab_size(groups.tp_size))
    reader = HFReader(hf_dir)
    model = build_gpt_model(arch, groups, perform_initialization=False, **build_kwargs)
    load_hf_weights(model, reader, mapping, groups)
    ids = torch.randint(0, arch.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    logits = forward_logits(model, groups, ids, arch.vocab_size)
    rel_err = None
    if logits is not None and groups.tp_rank == 0:
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(ids).logits
        rel_err = ((logits - ref).abs().max() / ref.abs().max()).item()
    exported, mismatched = [], []
    for name, tensor in export_hf_weights(model, mapping, groups):
        exported.append(name)
        if not torch.equal(tensor, reader.get(name)):
            mismatched.append(name)
    local = {
        "rank": groups.rank,
        "pp_rank": groups.pp_rank,
        "tp_rank": groups.tp_rank,
        "ep_rank": groups.ep_rank,
        # global expert indices this rank holds, per MoE layer (Megatron's numbering, which the export uses)
        "experts": _local_experts(model),
        "rel_err": rel_err,
        "exported": exported,
        "mismatched": mismatched,
    }
    gathered = [None] * groups.world_size
    dist.all_gather_object(gathered, local)
    expected = sorted(n for n in reader.names() if not mapping.is_ignorable_hf(n))
    return {"ranks": gathered, "expected": expected}


def _local_experts(model) -> list[list[int]]:
    return [
        list(layer.mlp.local_expert_indices)
        for chunk in chunks_of(model)
        for layer in chunk.decoder.layers
        if hasattr(layer.mlp, "router")
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument(
        "--layout", action="append", help="tp.pp.ep.etp.dispatcher (etp 0: as tp); repeatable"
    )
    parser.add_argument("--vpp", type=int, default=1, help="also check with this many model chunks per stage")
    parser.add_argument("--out", required=True)
    parser.add_argument("hf_dirs", nargs="+")
    args = parser.parse_args()
    if not args.layout:
        groups = init_parallel(args.tp, args.pp)
        report = {hf_dir: check_model(hf_dir, groups) for hf_dir in args.hf_dirs}
        if args.vpp > 1:  # the same stages cut into model chunks (interleaved pipeline)
            groups = init_parallel(args.tp, args.pp, vpp=args.vpp)
            split = [d for d in args.hf_dirs if load_arch(d).num_layers % (args.pp * args.vpp) == 0]
            report.update({f"vpp{args.vpp}:{d}": check_model(d, groups) for d in split})
    else:
        report = {}
        for layout in args.layout:
            tp, pp, ep, etp, dispatcher = layout.split(".")
            groups = init_parallel(int(tp), int(pp), ep=int(ep), etp=int(etp) or None)
            for hf_dir in args.hf_dirs:
                report[f"{layout}:{hf_dir}"] = check_model(hf_dir, groups, moe_dispatcher=dispatcher)
    if groups.rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
