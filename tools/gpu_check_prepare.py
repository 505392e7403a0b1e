"""Prepare what tools/gpu_check.py needs on a GPU machine that has no network and no package index, on THIS (CPU)
machine: ``.whl/`` with the cp312 wheels the GPU image lacks (megatron-core 0.16.1, hydra-core, omegaconf, the
antlr4 runtime built as a wheel, datasets and its small pure-Python needs) and ``.gpucheck/`` with the tokenizer
and a few dozen GSM8K rows (read through SPIN_SHARED_DATA). Both folders are git-ignored; the device tool
carries them (``carry=[".whl", ".gpucheck"]``). Prints the one command to run there.

    python tools/gpu_check_prepare.py [--shared-data ../shared/data] [--rows 48] [--extra pyarrow ...]

The GPU image (Python 3.12, torch 2.11, triton, transformers) is assumed to carry numpy, safetensors, requests,
tqdm, pyarrow and pandas; ``--extra NAME`` adds any other cp312 wheel (pyarrow is ~40 MB of the 64 MiB limit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
DATA = REPO / ".gpucheck"
# binary wheels for CPython 3.12 on x86_64 Linux, without dependencies (each listed explicitly)
BINARY = [
    "megatron-core==0.16.1", "hydra-core==1.3.2", "omegaconf==2.3.0", "datasets==3.6.0", "dill==0.3.8",
    "multiprocess==0.70.16", "xxhash", "fsspec==2025.3.0", "psutil",
]  # fmt: skip
SOURCE_ONLY = [
    "antlr4-python3-runtime==4.9.3"
]  # omegaconf's parser runtime: an sdist, built into a wheel here
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "config.json",
                   "generation_config.json", "special_tokens_map.json", "added_tokens.json")  # fmt: skip
CARRY_LIMIT = 64 << 20


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


def device_command() -> str:
    return (
        "pip install -q --no-index --no-deps .whl/*.whl && "
        "PYTHONPATH=$PWD SPIN_SHARED_DATA=$PWD/.gpucheck python tools/gpu_check.py --out $OUT"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--rows", type=int, default=48, help="GSM8K rows per split to carry")
    parser.add_argument("--extra", nargs="*", default=[], help="more cp312 wheels to carry (e.g. pyarrow)")
    parser.add_argument("--skip-wheels", action="store_true", help="data only (tests; no registry needed)")
    args = parser.parse_args(argv)
    if not args.skip_wheels:
        download_wheels(args.extra)
    copy_data(args.shared_data, args.rows)
    total = size_of(WHEELS) + size_of(DATA) if WHEELS.exists() else size_of(DATA)
    print(json.dumps({"wheels_mb": round(size_of(WHEELS) / 2**20, 1) if WHEELS.exists() else 0,
                      "data_mb": round(size_of(DATA) / 2**20, 1)}))  # fmt: skip
    if total > CARRY_LIMIT - (8 << 20):
        print(f"gpu_check_prepare: warning: {total / 2**20:.0f} MiB leaves under 8 MiB of the 64 MiB carry for the "
              "working tree", file=sys.stderr)  # fmt: skip
    print("device command (carry .whl and .gpucheck):\n  " + device_command())
    return 0


if __name__ == "__main__":
    sys.exit(main())
