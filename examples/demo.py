"""End-to-end demo on embedded data: corpus -> BPE tokenizer -> .bin/.idx -> train a tiny Llama -> sample text.

Run with `make demo` (or `python examples/demo.py`); `--quick` does a small version in well under a minute.
Every step is an ordinary Megalith command, printed before it runs, so it can be repeated by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "configs" / "tiny.yaml"


def tool(name: str) -> str:
    """A console script of this environment (next to the running Python), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        sys.exit(f"demo: {name} is not installed; run `make setup` first")
    return found


def run(step: str, cmd: list[str]) -> None:
    print(f"\n==> {step}\n    $ {' '.join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd))}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        sys.exit(f"demo: {step} failed (exit code {result.returncode})")
    print(f"    ({time.perf_counter() - start:.1f} s)", flush=True)


def build_data(out: Path, quick: bool) -> tuple[Path, Path]:
    """The stdlib corpus, a BPE tokenizer trained on it and its .bin/.idx (kept between runs)."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    corpus, tok, prefix = data / "stdlib.jsonl", data / "tokenizer", data / "stdlib"
    docs, vocab = ("150", "1024") if quick else ("1500", "4096")
    if not corpus.exists():
        run("[1/5] Building the corpus of this Python's standard-library sources",
            [tool("megalith-data"), "corpus", "stdlib", "--out", str(corpus), "--max-documents", docs])  # fmt: skip
    if not (tok / "tokenizer.json").exists():
        cmd = [tool("megalith-tokenizer"), "train", "--input", str(corpus), "--vocab-size", vocab, "--out", str(tok)]
        run(f"[2/5] Training a {vocab}-token byte-level BPE tokenizer", cmd)
    document = Path(f"{prefix}_text_document")
    if not document.with_suffix(".idx").exists():
        run("[3/5] Tokenizing into Megatron-compatible .bin/.idx files",
            [tool("megalith-preprocess"), "--input", str(corpus), "--output-prefix", str(prefix),
             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok), "--append-eod",
             "--workers", "2"])  # fmt: skip
    return document, tok


def train(out: Path, document: Path, tok: Path, steps: int, quick: bool) -> Path:
    run_dir = out / "train"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time
    size = ["model.hidden_size=64", "model.ffn_hidden_size=172", "data.seq_len=64", "training.global_batch_size=8",
            "training.eval_iters=2"] if quick else []  # fmt: skip
    interval = max(1, steps // 20)
    run(
        f"[4/5] Training a tiny Llama-style model for {steps} steps",
        [tool("megalith-train"), "--config", str(TINY), *size,
         f"data.blend={document}", "data.split=98,2,0", "data.tokenizer_type=HuggingFaceTokenizer",
         f"data.tokenizer_model={tok}", f"training.train_iters={steps}", f"training.eval_interval={max(1, steps // 2)}",
         f"schedule.warmup_steps={max(1, steps // 10)}", f"logging.log_interval={interval}",
         f"logging.run_dir={run_dir}", f"--save={run_dir}/checkpoints", "checkpoint.save_interval=null"],
    )  # fmt: skip
    return run_dir


def report_loss(run_dir: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    print(f"\n    training loss fell from {losses[0]:.3f} to {losses[-1]:.3f}", end="")
    print(f"; validation loss {evals[-1]:.3f} (perplexity {math.exp(evals[-1]):.1f})" if evals else "")


def sample(checkpoints: Path, prompts: list[str], max_new_tokens: int) -> None:
    print("\n==> [5/5] Generating from the checkpoint (greedy)")
    from megalith.export.generate import generate_from_checkpoint

    texts = generate_from_checkpoint(str(checkpoints), prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    for prompt, text in zip(prompts, texts, strict=True):
        print(f"    --- prompt {prompt!r}\n{text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="where data, logs and checkpoints go")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 600, or 30 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a small corpus, vocabulary and model (about a minute)")
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.quick else 600)
    out = Path(args.out)
    document, tok = build_data(out, args.quick)
    run_dir = train(out, document, tok, steps, args.quick)
    report_loss(run_dir)
    sample(run_dir / "checkpoints", ["def ", "import os\n"], 16 if args.quick else 48)
    print("\n==> Where to look")
    print(f"    metrics (one JSON line per logged step): {run_dir / 'metrics.jsonl'}")
    print(f"    TensorBoard:  {Path(sys.executable).parent / 'tensorboard'} --logdir {run_dir / 'tensorboard'}")
    print(f"    checkpoint:   {run_dir / 'checkpoints'}  (export: megalith-export hf --load ... --out ...)")
    print(f"    resolved config: {run_dir / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
