"""Training-loop benchmarks: checkpoint throughput, async-save stall, loop overhead, and (on a GPU) MFU vs HF.

Table 1 saves and loads the full training state (model + fp32 masters + both Adam moments) of a ~30M
parameter model through `Trainer.save_checkpoint` / `Trainer.load_checkpoint` and reports GB/s; the async row
gives how long `save()` blocks the training thread (the CPU copy) and how much slower the steps that overlap
the background write are than steps without one.
Table 2 compares `Trainer.fit()` per step against a bare loop over the same model chunks and optimizer
(pre-fetched batches, `forward_backward` + `AdamW.step`, nothing else), and against plain PyTorch
(`Transformer` forward/backward + `torch.optim.AdamW`); target: loop overhead <= 5% on CPU.
Table 3 (only with a CUDA GPU): llama3-1b at seq 2048 in bf16, Megalith's MFU against a plain training loop
over Hugging Face transformers' LlamaForCausalLM (same config, SDPA attention, bf16, fused AdamW).

Run: .venv/bin/python benchmarks/training.py [--steps 20] [--skip-gpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import statistics
import tempfile
import time

import torch

from megalith.core import build_loss_fn, build_model_chunks, flops_per_token
from megalith.training.config_tree import load_config
from megalith.training.run_config import RunConfig
from megalith.training.trainer import Trainer

CKPT_MODEL = ["model.preset=tiny", "model.hidden_size=512", "model.num_layers=8", "model.num_attention_heads=8",
              "model.ffn_hidden_size=2048", "model.vocab_size=8192", "model.max_seq_len=256"]  # fmt: skip
LOOP_MODEL = ["model.preset=tiny", "model.hidden_size=256", "model.num_layers=4", "model.num_attention_heads=4",
              "model.ffn_hidden_size=1024", "model.vocab_size=4096", "model.max_seq_len=256"]  # fmt: skip


def _config(tmp: str, model: list[str], *extra: str) -> RunConfig:
    return load_config(
        RunConfig,
        None,
        [*model, "data.seq_len=128", "training.micro_batch_size=4", "training.global_batch_size=8",
         "logging.tensorboard=false", "logging.log_interval=10", "schedule.decay_style=constant",
         f"logging.run_dir={tmp}/run", *extra],
    )  # fmt: skip


class _Timed(Trainer):
    """Records the wall time of every step (between successive on_step_end calls)."""

    def on_step_end(self, out) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self.last_mark)
        self.last_mark = now


def _state_bytes(trainer: Trainer) -> int:
    from megalith.training.train_state import model_state, optimizer_state

    state = {**model_state(trainer.chunks), **optimizer_state(trainer.optimizer)}
    return sum(s.tensor.numel() * s.tensor.element_size() for s in state.values())


def checkpoint_table(steps: int) -> list[tuple[str, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(tmp, CKPT_MODEL, f"training.train_iters={steps + 4}", f"checkpoint.save={tmp}/ck",
                      "checkpoint.keep_last=1")  # fmt: skip
        trainer = Trainer(cfg, stream=io.StringIO())
        size = _state_bytes(trainer) / 1e9
        saves, loads = [], []
        for _ in range(3):
            start = time.perf_counter()
            trainer.save_checkpoint()
            saves.append(time.perf_counter() - start)
            trainer.step += 1
        rows.append(("state size", f"{size:.3f} GB (model + fp32 master + 2 moments)"))
        rows.append(("sync save (CRC32 taken while writing)", f"{min(saves):.3f} s = {size / min(saves):.2f} GB/s"))
        for verify in ("checksum", "size", "checksum", "size"):  # interleaved; the best of each is kept
            trainer.cfg = dataclasses.replace(
                trainer.cfg, checkpoint=dataclasses.replace(trainer.cfg.checkpoint, verify=verify)
            )
            for _ in range(2):
                start = time.perf_counter()
                trainer.load_checkpoint(f"{tmp}/ck")
                loads.append((verify, time.perf_counter() - start))
        for verify, what in (("checksum", "sizes + CRC32 of every file"), ("size", "sizes only")):
            best = min(t for v, t in loads if v == verify)
            rows.append((f"load, checkpoint.verify={verify}", f"{best:.3f} s = {size / best:.2f} GB/s ({what})"))
        trainer.close()
        rows += _async_rows(tmp, steps, min(saves))
    return rows


def _async_rows(tmp: str, steps: int, sync_save: float) -> list[tuple[str, str]]:
    cfg = _config(tmp, CKPT_MODEL, f"training.train_iters={steps + 4}", f"checkpoint.save={tmp}/ck2",
                  "checkpoint.async_save=true", "checkpoint.keep_last=1")  # fmt: skip
    trainer = Trainer(cfg, stream=io.StringIO())
    batches = [trainer.train_data[i] for i in range(cfg.training.global_batch_size)]
    micro = [_to_batch(batches[i : i + 4]) for i in range(0, len(batches), 4)]
    for _ in range(2):
        trainer.train_step(micro)
    plain = _time_steps(trainer, micro, steps)
    start = time.perf_counter()
    trainer.save_checkpoint()
    blocked = time.perf_counter() - start
    overlapped = []
    while trainer.checkpoints.saving:
        overlapped += _time_steps(trainer, micro, 1)
    trainer.close()
    base = statistics.median(plain)
    slow = statistics.median(overlapped) if overlapped else base
    return [
        ("async save: save() blocks", f"{blocked:.3f} s ({blocked / sync_save:.0%} of a sync save)"),
        ("async save: steps while writing", f"{len(overlapped)} steps, median {slow * 1e3:.1f} ms vs "
                                            f"{base * 1e3:.1f} ms ({slow / base - 1:+.0%})"),
    ]  # fmt: skip


def _to_batch(items):
    return {
        "input_ids": torch.stack([torch.as_tensor(it["input_ids"]) for it in items]),
        "labels": torch.stack([torch.as_tensor(it["labels"]) for it in items]),
    }


def _time_steps(trainer: Trainer, micro, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        trainer.optimizer.zero_grad()
        trainer.forward_backward(micro)
        trainer.optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def loop_table(steps: int, repeats: int = 3) -> list[tuple[str, str]]:
    fit_times, bare_times, torch_times = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):  # interleaved, best median of each
            cfg = _config(f"{tmp}/{r}", LOOP_MODEL, f"training.train_iters={steps + 3}")
            trainer = _Timed(cfg, stream=io.StringIO())
            trainer.step_times, trainer.last_mark = [], time.perf_counter()
            trainer.fit()
            fit_times.append(statistics.median(trainer.step_times[3:]))
            micro = [
                _to_batch([trainer.train_data[i + j] for j in range(4)])
                for i in range(0, cfg.training.global_batch_size, 4)
            ]
            bare_times.append(statistics.median(_time_steps(trainer, micro, steps)))
            torch_times.append(_plain_torch(trainer, micro, steps))
            trainer.close()
    fit, bare, plain = min(fit_times), min(bare_times), min(torch_times)
    return [
        ("plain PyTorch (Transformer + torch AdamW)", f"{plain * 1e3:.1f} ms/step"),
        ("bare loop (forward_backward + AdamW.step)", f"{bare * 1e3:.1f} ms/step"),
        ("Trainer.fit (data, schedule, checks, logging)", f"{fit * 1e3:.1f} ms/step"),
        ("loop overhead over the bare loop", f"{fit / bare - 1:+.1%} (target <= +5%)"),
    ]


def _plain_torch(trainer: Trainer, micro, steps: int) -> float:
    (model,) = build_model_chunks(trainer.model_config, seed=1)
    loss_fn = build_loss_fn(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad()
        for b in micro:
            (loss_fn(model(b["input_ids"]), b["labels"]).mean() / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def gpu_table(steps: int) -> list[tuple[str, str]]:
    """llama3-1b, seq 2048, bf16 on one GPU: Megalith vs Hugging Face transformers (SDPA, fused AdamW)."""
    from megalith.training.metrics import peak_tflops

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(RunConfig, None, [
            "model.preset=llama3-1b", "data.seq_len=2048", "precision.dtype=bf16", "parallel.device=cuda",
            "training.micro_batch_size=2", "training.global_batch_size=8", f"training.train_iters={steps + 3}",
            "logging.tensorboard=false", f"logging.run_dir={tmp}/run", "logging.log_interval=1000",
        ])  # fmt: skip
        trainer = _Timed(cfg, stream=io.StringIO())
        trainer.step_times, trainer.last_mark = [], time.perf_counter()
        trainer.fit()
        torch.cuda.synchronize()
        ours = statistics.median(trainer.step_times[3:])
        model_config = trainer.model_config
        trainer.close()
        del trainer
        torch.cuda.empty_cache()
    hf = _hf_step_time(model_config, steps, micro=2, accumulation=4, seq=2048)
    tokens = 8 * 2048
    peak = peak_tflops(torch.cuda.get_device_name(), "bf16") or float("nan")
    flops = flops_per_token(model_config, 2048) * tokens / 1e12
    return [
        ("device", torch.cuda.get_device_name()),
        ("Megalith llama3-1b", f"{ours * 1e3:.0f} ms/step, {flops / ours:.0f} TFLOP/s, MFU {flops / ours / peak:.1%}"),
        ("HF LlamaForCausalLM", f"{hf * 1e3:.0f} ms/step, {flops / hf:.0f} TFLOP/s, MFU {flops / hf / peak:.1%}"),
        ("Megalith / HF throughput", f"{hf / ours:.2f}x"),
    ]


def _hf_step_time(config, steps: int, *, micro: int, accumulation: int, seq: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_base,
        rope_scaling={"rope_type": "llama3", **config.rope_scaling}, tie_word_embeddings=config.tie_embeddings,
        attn_implementation="sdpa", torch_dtype=torch.bfloat16,
    )  # fmt: skip
    model = LlamaForCausalLM(hf_config).to("cuda", torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    ids = torch.randint(0, config.vocab_size, (micro, seq), device="cuda")
    times = []
    for _ in range(steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulation):
            (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n{'-' * len(title)}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--only", choices=["checkpoint", "loop", "gpu"], help="run one table only")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    if args.only in (None, "checkpoint"):
        print_table("Checkpoints (one process, local disk)", checkpoint_table(args.steps))
    if args.only == "checkpoint":
        return
    print_table("Loop overhead on CPU (median step time)", loop_table(args.steps))
    if torch.cuda.is_available() and not args.skip_gpu:
        print_table("GPU: llama3-1b, seq 2048, bf16", gpu_table(args.steps))
    else:
        print("\nGPU table skipped: no CUDA device")


if __name__ == "__main__":
    main()
