"""`make demo-convert`: the converter end to end on CPU, in about a minute.

1. a tiny random-weight Qwen2.5-shaped model with the real Qwen2.5 tokenizer (from ../shared/data);
2. `spin-convert hf-to-mcore --tp 2`: two local gloo ranks write a Megatron-Core distributed checkpoint;
3. `spin-convert verify --tp 1 --pp 2`: reloaded at another layout (resharding), logits vs transformers;
4. `spin-convert mcore-to-hf`: back to an HF folder, checked bit-exact, then loaded with transformers and
   the tokenizer for a short greedy generation (gibberish: the weights are random).

(`make demo` runs the trainer itself: tools/demo.py.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RUN_DIR = REPO / "runs" / "demo"


def convert(*args) -> None:
    cmd = [sys.executable, "-m", "spin_megatron.convert", *map(str, args)]
    print("$ spin-convert " + " ".join(map(str, args)), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"  ({time.time() - start:.1f} s)\n", flush=True)


def main() -> int:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spin_megatron.models.tiny import make_tiny_hf_model

    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)  # the demo's own scratch folder
    tokenizer_dir = SHARED / "qwen2.5-tokenizer"
    has_tokenizer = (tokenizer_dir / "vocab.json").is_file()
    if not has_tokenizer:
        print(f"note: {tokenizer_dir} not found; using a 250-token vocabulary and no tokenizer\n")
    hf_dir = make_tiny_hf_model(
        RUN_DIR / "hf",
        "qwen2",
        seed=0,
        tokenizer_dir=tokenizer_dir if has_tokenizer else None,
        vocab_size=151936 if has_tokenizer else 250,
        tie_word_embeddings=True,
        eos_token_id=151645 if has_tokenizer else None,
    )
    print(f"tiny random Qwen2 model: {hf_dir}\n")

    mcore_dir, hf_back = RUN_DIR / "mcore", RUN_DIR / "hf_roundtrip"
    convert("hf-to-mcore", "--hf-dir", hf_dir, "--out", mcore_dir, "--tp", 2)
    convert("verify", "--hf-dir", hf_dir, "--mcore-dir", mcore_dir, "--tp", 1, "--pp", 2)
    convert("mcore-to-hf", "--mcore-dir", mcore_dir, "--out", hf_back)

    original = load_file(hf_dir / "model.safetensors")
    back = {}
    for path in hf_back.glob("*.safetensors"):
        back.update(load_file(path))
    same = sorted(original) == sorted(back) and all(torch.equal(original[k], back[k]) for k in original)
    print(f"HF -> Megatron (TP2) -> HF round trip: {len(back)} tensors, bit-exact: {same}")
    if not same:
        return 1

    if has_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(hf_back)
        model = AutoModelForCausalLM.from_pretrained(hf_back, dtype=torch.float32).eval()
        question = (SHARED / "gsm8k" / "test.jsonl").read_text().splitlines()[0][14:90]
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        print(
            f"greedy continuation of a GSM8K prompt by the exported model: {tokenizer.decode(out[0, ids.shape[1] :])!r}"
        )
    print(
        f"\noutputs in {RUN_DIR}: hf/ (source), mcore/ (Megatron-Core checkpoint), hf_roundtrip/ (exported)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
