"""Prepare what tools/gpu_check.py needs on a GPU machine that has no network and no package index, on THIS (CPU)
machine: ``.whl/`` with the cp312 wheels the GPU image lacks (megatron-core 0.16.1, hydra-core, omegaconf, the
antlr4 runtime built as a wheel, datasets and its small pure-Python needs) and ``.gpucheck/`` with the tokenizer
and a few dozen GSM8K rows (read through SPIN_SHARED_DATA). Both folders are git-ignored; the device tool
carries them (``carry=[".whl", ".gpucheck"]``). The payload must stay under 20 MB. Prints the one command to run
there: it installs nothing into the image's environment and nothing from an index — the carried wheels that the
image lacks (``--not-in-image``: a distribution the image has is left to the image, except megatron-core, which
must be 0.16.1) go into a folder of their own with ``pip install --no-index --no-deps --target``, which the check
reads through PYTHONPATH.

    python tools/gpu_check_prepare.py [--shared-data ../shared/data] [--rows 48] [--extra pyarrow ...]
    python3 tools/gpu_check_prepare.py --not-in-image .whl      # (stdlib only) the wheels to install there

The GPU image (Python 3.12, torch 2.11, triton) is assumed to carry transformers, numpy, requests, tqdm, pyarrow
and pandas (the check's env phase lists what it lacks); ``--extra NAME`` adds any other cp312 wheel, e.g.
``--extra transformers tokenizers huggingface-hub regex --max-payload-mb 32`` for an image without transformers
(~18 MB more; pyarrow alone is ~40 MB).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
DATA = REPO / ".gpucheck"
# binary wheels for CPython 3.12 on x86_64 Linux, without dependencies (each listed explicitly)
BINARY = [
    "megatron-core==0.16.1", "hydra-core==1.3.2", "omegaconf==2.3.0", "datasets==3.6.0", "dill==0.3.8",
    "multiprocess==0.70.16", "xxhash", "fsspec==2025.3.0", "psutil",
    "pyyaml", "packaging", "safetensors",  # hydra's, omegaconf's, spin_megatron.models': only if missing there
]  # fmt: skip
SOURCE_ONLY = [
    "antlr4-python3-runtime==4.9.3"
]  # omegaconf's parser runtime: an sdist, built into a wheel here
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "config.json",
                   "generation_config.json", "special_tokens_map.json", "added_tokens.json")  # fmt: skip
PAYLOAD_LIMIT = 20 << 20  # wheels + data; the device tool carries 64 MiB with the working tree
SITE = "/tmp/spin-site"  # where the device command installs the carried wheels
PINNED = {"megatron-core": "0.16.1"}  # installed from the carry even where the image has another version


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download_wheels(extra: list[str]) -> None:
    WHEELS.mkdir(exist_ok=True)
    platform = ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux_2_28_x86_64", "--platform", "any"]  # fmt: skip
    _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platform, "-d", str(WHEELS), *BINARY, *extra)  # fmt: skip
    _pip("wheel", "-q", "--no-deps", "-w", str(WHEELS), *SOURCE_ONLY)


def copy_data(shared: Path, rows: int) -> None:
    tokenizer = shared / "qwen2.5-tokenizer"
    if not (tokenizer / "vocab.json").is_file():
        raise SystemExit(f"gpu_check_prepare: error: no tokenizer at {tokenizer}; pass --shared-data DIR")
    (DATA / "qwen2.5-tokenizer").mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, DATA / "qwen2.5-tokenizer" / name)
    (DATA / "gsm8k").mkdir(exist_ok=True)
    for split in ("train", "test"):
        lines = (shared / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:rows]
        (DATA / "gsm8k" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def wheel_distribution(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def not_in_image(wheels: Path) -> list[Path]:
    """The carried wheels to install: those whose distribution this Python lacks, and pinned ones at another
    version. Everything else stays the image's (carrying a second copy would shadow it through PYTHONPATH)."""
    wanted = []
    for wheel in sorted(wheels.glob("*.whl")):
        name, version = wheel_distribution(wheel)
        try:
            present = metadata.version(name)
        except metadata.PackageNotFoundError:
            present = None
        if present is None or (name in PINNED and present != PINNED[name]):
            wanted.append(wheel)
    return wanted


def install_command(site: str = SITE) -> str:
    """Install the carried wheels the image lacks into ``site``: not into the image's environment, not from an
    index (the image's python3; this file's --not-in-image needs only the standard library)."""
    return (
        "W=$(python3 tools/gpu_check_prepare.py --not-in-image .whl) || exit 1; "
        f'[ -z "$W" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target {site} $W || exit 1; '
    )


def device_command(out: str = "$OUT", site: str = SITE) -> str:
    """The one command for the GPU machine: the install above, then the check with ``site`` on PYTHONPATH."""
    return install_command(site) + (
        f"PYTHONPATH={site}:$PWD SPIN_SHARED_DATA=$PWD/.gpucheck PYTHONUNBUFFERED=1 "
        f"python3 tools/gpu_check.py --out {out}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--rows", type=int, default=48, help="GSM8K rows per split to carry")
    parser.add_argument("--extra", nargs="*", default=[], help="more cp312 wheels to carry (e.g. pyarrow)")
    parser.add_argument("--skip-wheels", action="store_true", help="data only (tests; no registry needed)")
    parser.add_argument(
        "--not-in-image", type=Path, metavar="WHEELS", help="print the wheels to install, and exit"
    )
    parser.add_argument("--max-payload-mb", type=float, default=PAYLOAD_LIMIT / 2**20, help="refuse more")
    args = parser.parse_args(argv)
    if args.not_in_image is not None:  # on the GPU machine: stdlib only, before anything is installed
        print(" ".join(str(w) for w in not_in_image(args.not_in_image)))
        return 0
    if not args.skip_wheels:
        download_wheels(args.extra)
    copy_data(args.shared_data, args.rows)
    sizes = {
        "wheels_mb": size_of(WHEELS) / 2**20 if WHEELS.exists() else 0.0,
        "data_mb": size_of(DATA) / 2**20,
    }
    print(json.dumps({k: round(v, 1) for k, v in sizes.items()}))
    if sum(sizes.values()) > args.max_payload_mb:
        print(f"gpu_check_prepare: error: the payload is {sum(sizes.values()):.1f} MB, over --max-payload-mb "
              f"{args.max_payload_mb:g}: carry fewer --extra wheels or --rows, or raise the bound (the device tool "
              "carries 64 MiB with the working tree)", file=sys.stderr)  # fmt: skip
        return 1
    print("device command (carry .whl and .gpucheck):\n  " + device_command())
    return 0


if __name__ == "__main__":
    sys.exit(main())
