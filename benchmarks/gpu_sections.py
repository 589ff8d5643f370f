"""The sections of the GPU report (benchmarks/gpu_report.py): each runs in its own process and fills a `Record`.

A section function takes (record, options) and adds tables, text and notes to the record, saving it as it goes, so
that a section stopped at its time limit still leaves what it measured. Every section that needs the GPU says so
in one line when there is none. Torch and Megalith are imported inside the sections: the build section installs
Megalith first, and the dry run imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu-carry"  # pure-Python wheels built here (`make gpu-carry`): the device has no hatchling
PURE_PACKAGES = ["packages/data", "packages/core", "packages/training", "packages/export"]


class Record:
    """A section's results, written to `path` (JSON, through a temporary name) after every change."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.body: dict = {"tables": [], "text": [], "notes": [], "data": {}}

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        self.body["tables"].append({"title": title, "columns": columns, "rows": rows})
        self.save()

    def text(self, title: str, text: str) -> None:
        self.body["text"].append({"title": title, "text": text})
        self.save()

    def note(self, line: str) -> None:
        self.body["notes"].append(line)
        self.save()

    def data(self, key: str, value) -> None:
        self.body["data"][key] = value
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.body, f, indent=1, default=str, allow_nan=True)
        os.replace(tmp, self.path)


def _need_gpu():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU, and torch sees none")
    return torch


def _run(cmd: list[str], *, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `cmd` in the repository, its output echoed into this section's log; raises with the last line on
    failure."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    sys.stdout.write(proc.stdout + proc.stderr)
    if proc.returncode:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {lines[-1][:300]}")
    return proc


def sibling(name: str):
    """benchmarks/<name>.py as a module, loaded by path: an installed package of the same name (transformers
    brings one called `kernels`) may already be imported under the plain name."""
    key = f"_megalith_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[key]


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


# ---- environment ------------------------------------------------------------------------------------------


def section_environment(rec: Record, opts) -> None:
    """Date, Python, torch, CUDA, driver, nvcc, the GPU and the commit (before anything is built)."""
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "commit": _git_commit(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info.update(gpu=torch.cuda.get_device_name(0), capability=capability, driver=_driver_version(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 2), multiprocessors=props.multi_processor_count,
                    nvcc=_nvcc_version())  # fmt: skip
    else:
        info.update(gpu=None, driver=_driver_version(), nvcc=_nvcc_version())
    rec.data("environment", info)
    rec.table("environment", ["field", "value"], [[k, _fmt(v)] for k, v in info.items()])


def _git_commit() -> str | None:
    """This tree's commit (`+` when files differ from it); on a machine the tree was copied to without its git
    folder, the one `make gpu-carry` recorded."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True)  # fmt: skip
    except OSError:
        head = None
    if head is not None and head.returncode == 0 and head.stdout.strip():
        return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    recorded = CARRY / "commit"
    return recorded.read_text().strip() + " (recorded by make gpu-carry)" if recorded.exists() else None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _nvcc_version() -> str | None:
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"release ([\d.]+)", out.stdout)
    return match.group(1) if match else None


# ---- build ------------------------------------------------------------------------------------------------


def source_digest() -> str:
    """A digest of the pure-Python packages' sources (what the carried wheels must have been built from)."""
    digest = hashlib.sha256()
    for package in PURE_PACKAGES:
        files = [Path(package, "pyproject.toml"), *sorted(Path(package, "src").rglob("*.py"))]
        for path in files:
            digest.update(str(path).encode() + b"\0" + (ROOT / path).read_bytes() + b"\0")
    return digest.hexdigest()


def prepare_carry() -> None:
    """Builds the four pure-Python wheels into .gpu-carry with the digest of their sources (run here, not there)."""
    CARRY.mkdir(exist_ok=True)
    for old in CARRY.glob("*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(CARRY),
           *PURE_PACKAGES]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True)
    (CARRY / "digest").write_text(source_digest() + "\n")
    (CARRY / "commit").write_text((_git_commit() or "unknown") + "\n")
    print(f"{CARRY}: {', '.join(p.name for p in sorted(CARRY.glob('*.whl')))}")


def _cuda_arch(torch) -> str:
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}{minor}" + ("a" if major >= 9 else "")  # sm_90a/sm_100a: the arch-specific instructions


def section_build(rec: Record, opts) -> None:
    """Builds megalith-kernels for this GPU only and installs it with the carried pure-Python wheels."""
    wheels = sorted(CARRY.glob("*.whl"))
    if len(wheels) != len(PURE_PACKAGES) or not (CARRY / "digest").exists():
        raise RuntimeError("no carried wheels in .gpu-carry: run `make gpu-carry` here and name .gpu-carry in carry")
    if (CARRY / "digest").read_text().strip() != source_digest():
        raise RuntimeError("the wheels in .gpu-carry were built from other sources than packages/: run make gpu-carry")
    torch = _need_gpu()
    arch = _cuda_arch(torch)
    env = {**os.environ, "MEGALITH_CUDA": "ON", "MEGALITH_CUDA_ARCHS": arch,
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 8)}  # fmt: skip
    start = time.perf_counter()
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation"]
    _run([*pip, "."], timeout=opts.time_left, env=env)
    built = time.perf_counter() - start
    _run([*pip, *map(str, wheels)], timeout=60)
    probe = "import json, megalith.kernels as k, megalith.training; print(json.dumps(k.build_info()))"
    info = json.loads(_run([sys.executable, "-c", probe], timeout=60).stdout.strip().splitlines()[-1])
    rec.data("build", {"arch": arch, "seconds": round(built, 1), "build_info": info})
    rows = [["arch", arch], ["build seconds", f"{built:.0f}"], *[[k, _fmt(v)] for k, v in info.items()]]
    rec.table("build", ["field", "value"], rows)


# ---- tests ------------------------------------------------------------------------------------------------


def section_tests(rec: Record, opts) -> None:
    """The cuda-marked tests, one pytest process per file (killed at the file's limit), each test limited too."""
    _need_gpu()
    deadline = time.monotonic() + opts.time_left
    cmd = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "cuda", "--continue-on-collection-errors",
           "-p", "no:cacheprovider", "tests"]  # fmt: skip
    collect = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    sys.stdout.write(collect.stdout[-5000:] + collect.stderr[-5000:])
    files = sorted({line.split("::")[0] for line in collect.stdout.splitlines() if "::" in line})
    if not files:
        last = (collect.stderr or collect.stdout).strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"no cuda-marked tests were collected (pytest exited {collect.returncode}: {last[-1]})")
    if collect.returncode not in (0, 5):
        rec.note(f"collection reported errors (pytest exited {collect.returncode}); see gpu-report.log")
    totals = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures, rows = [], []
    for path in files:
        limit = max(5.0, min(deadline - time.monotonic() - 5, 300))  # a stopped file still leaves a record
        counts, failed = run_test_file(path, limit=limit, test_timeout=opts.test_timeout, args=["-m", "cuda"])
        for key in totals:
            totals[key] += counts.get(key, 0)
        failures += failed
        rows.append([path, *(counts.get(k, 0) for k in totals)])
        rec.data("tests", {"totals": totals, "failures": failures})
        rec.body["tables"] = [{"title": "cuda tests by file", "columns": ["file", *totals], "rows": rows}]
        rec.save()
    if failures:
        rec.table("failures", ["test", "message"], [[t, m] for t, m in failures])


def run_test_file(path: str, *, limit: float, test_timeout: float, args: list[str]) -> tuple[dict, list]:
    """Runs pytest on one file with a per-test limit (tests/conftest.py's --test-timeout) and kills it at `limit`
    seconds. Returns ({passed, failed, error, skipped}, [(test id, first line of its failure)])."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", *args, path, f"--junitxml={xml}",
               f"--test-timeout={test_timeout}", "-p", "no:cacheprovider"]  # fmt: skip
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"error": 1}, [(path, f"the file ran past its {limit:.0f} s limit and was stopped")]
        sys.stdout.write(proc.stdout[-20000:] + proc.stderr[-5000:])
        if not os.path.exists(xml):
            last = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
            return {"error": 1}, [(path, f"pytest exited {proc.returncode}: {last[-1][:200]}")]
        return _junit(xml)


def _junit(path: str) -> tuple[dict, list]:
    """(counts, [(test id, first line of its message)]) from a junit XML file pytest wrote."""
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures = []
    try:
        cases = list(ET.parse(path).getroot().iter("testcase"))
    except ET.ParseError as exc:
        return {"error": 1}, [(path, f"unreadable junit XML: {exc}")]
    for case in cases:
        test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        kind = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(getattr(outcome, "tag", ""), "passed")
        counts[kind] += 1
        if kind in ("failed", "error"):
            failures.append((test, ((outcome.get("message") or "").splitlines() or [""])[0][:200]))
    return counts, failures


# ---- kernels and attention ----------------------------------------------------------------------------------


def section_kernels(rec: Record, opts) -> None:
    """The copy and matmul ceilings, then each fused op forward and backward against the torch computation it
    replaces (kernels="torch") at llama3-8b training sizes, with the choice runtime.kernels="auto" would record."""
    torch = _need_gpu()
    kernels = sibling("kernels")

    ceilings = {"copy_gbs": kernels.copy_bandwidth("cuda", opts.repeats) / 1e9,
                "bf16_matmul_tflops": kernels.matmul_tflops("cuda", opts.repeats)}  # fmt: skip
    rec.data("ceilings", ceilings)
    rec.note(f"ceilings measured here: device-to-device copy {ceilings['copy_gbs']:,.0f} GB/s (read + write), bf16 "
             f"8192^3 matmul {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s (random data)")  # fmt: skip
    shape, by_dtype = kernels.CUDA_SHAPE, {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        rows = kernels.measure(shape, "cuda", dtype, opts.repeats, None)
        by_dtype[name] = rows
        rec.table(f"fused ops, {name}, B,S,H,N,K,D,F,V = {shape}, best of {opts.repeats} (milliseconds)",
                  ["op", "fused fwd", "torch fwd", "fused f+b", "torch f+b", "fused/torch", "auto"],
                  [[r["op"], _fmt(r["fused_fwd_ms"]), _fmt(r["torch_fwd_ms"]), _fmt(r["fused_ms"]),
                    _fmt(r["torch_ms"]), f"{r['fused_ms'] / r['torch_ms']:.2f}x", r["choice"]]
                   for r in rows])  # fmt: skip
    rec.data("kernels", by_dtype)
    run_conditions = kernels.conditions("cuda", shape, opts.repeats) | {"clock": "wall"}
    rec.data("kernels_conditions", run_conditions)
    table = write_cuda_auto_table(Path(opts.out), by_dtype, run_conditions)
    rec.note(
        f"the auto column is merged into {table.name} beside this report (the packaged CPU rows plus these): "
        "copy it over python/megalith/kernels/auto_table.json to make runtime.kernels='auto' use it"
    )


def write_cuda_auto_table(out: Path, by_dtype: dict, run_conditions: dict) -> Path:
    """`out/auto_table.json`: the packaged kernel auto table with these CUDA rows merged in. Committing it over
    python/megalith/kernels/auto_table.json makes runtime.kernels='auto' choose from these measurements on CUDA
    (until then every CUDA op is "torch")."""
    kernels = sibling("kernels")

    out.mkdir(parents=True, exist_ok=True)
    table = out / "auto_table.json"
    shutil.copyfile(kernels.AUTO_TABLE, table)
    kernels.write_auto_table(table, {"cuda": by_dtype}, {"cuda": run_conditions})
    return table


def section_attention(rec: Record, opts) -> None:
    """Megalith attention against SDPA flash, cuDNN and memory-efficient at llama3-8b shapes."""
    _need_gpu()
    attention = sibling("attention")

    rows = attention.llama_shapes(opts.repeats)
    rec.data("attention", rows)
    table = [[r["batch"], r["seq"], r["impl"], *(["unavailable: " + r["error"][:60], "", "", ""] if "error" in r else
              [_fmt(r["fwd_ms"]), f"{r['fwd_tflops']:.0f}", _fmt(r["fwd_bwd_ms"]), f"{r['fwd_bwd_tflops']:.0f}"]),
              "" if "error" in r else f"{r['ratio_fwd_bwd']:.2f}x"] for r in rows]  # fmt: skip
    rec.table("attention, bf16, causal, Hq 32 / Hkv 8, D 128 (ratio: fwd+bwd against sdpa flash)",
              ["B", "S", "impl", "fwd ms", "fwd TF/s", "fwd+bwd ms", "f+b TF/s", "ratio"], table)  # fmt: skip


def section_moe(rec: Record, opts) -> None:
    """Mixture of experts on one GPU (benchmarks/moe.py table 3): the grouped GEMM (torch._grouped_mm) against one
    matmul per expert at Mixtral-like and fine-grained shapes, and tiny-moe training tokens/s."""
    _need_gpu()
    moe = sibling("moe")

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        moe.table_gpu(opts.repeats)
    rec.text("benchmarks/moe.py table 3 (bf16)", out.getvalue().strip())


def section_context(rec: Record, opts) -> None:
    """Long context on one GPU (benchmarks/context.py table 3): llama3-1b at 32k tokens, full recompute, causal
    attention over the whole sequence against 8 packed documents (cu_seqlens)."""
    _need_gpu()
    context = sibling("context")

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        context.gpu_table(32768, 1)
    rec.text("benchmarks/context.py table 3 (bf16)", out.getvalue().strip())


# ---- communication and fp8 ----------------------------------------------------------------------------------


def section_comm(rec: Record, opts) -> None:
    """The direct NCCL communicator against torch's process group at world size 1 (benchmarks/comm.py)."""
    _need_gpu()
    cmd = [sys.executable, "benchmarks/comm.py", "--iters", "20", "--repeats", "3", "--warmup", "5"]
    out = _run(cmd, timeout=opts.time_left - 2).stdout
    rec.text("benchmarks/comm.py at world size 1 (latency; algorithm bandwidth)", out.strip())


def section_fp8(rec: Record, opts) -> None:
    """benchmarks/fp8.py --cuda: each recipe's cost per linear, torch._scaled_mm TFLOP/s against the bf16 GEMM."""
    _need_gpu()
    out = _run([sys.executable, "benchmarks/fp8.py", "--cuda"], timeout=opts.time_left - 2).stdout
    rec.text("benchmarks/fp8.py --cuda", out.strip()[-6000:])


# ---- training steps: Megalith against Hugging Face transformers ---------------------------------------------


def _build_trainer(name: str, tmp: str, *, device: str, micro_batch: int, compile_blocks: bool):
    import dataclasses

    peer = sibling("peer")

    from megalith.training.trainer import Trainer

    cfg = peer.megalith_config(name, tmp, kernels="fused", device=device)
    training = dataclasses.replace(cfg.training, micro_batch_size=micro_batch, global_batch_size=micro_batch)
    runtime = dataclasses.replace(cfg.runtime, compile=compile_blocks)
    return Trainer(dataclasses.replace(cfg, training=training, runtime=runtime), stream=sys.stdout)


class _Stepper:
    """Times steps of one contender and records its memory: resident (model, optimizer) and activation peak."""

    def __init__(self, torch, device: str, step) -> None:
        self.torch, self.cuda, self.step = torch, device == "cuda", step
        self.seconds: list[float] = []
        self.activation_peak = 0.0
        self.resident = float("nan")

    def __call__(self, timed: bool = True) -> None:
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        self.step()
        if self.cuda:
            torch.cuda.synchronize()
            self.activation_peak = max(self.activation_peak, (torch.cuda.max_memory_allocated() - before) / 2**30)
        if timed:
            self.seconds.append(time.perf_counter() - start)


def _allocated(torch, device: str) -> float:
    return torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")


def _largest_micro_batch(torch, resident: float, per_sequence: float) -> int:
    """The largest power of two (<= 16) whose activations fit beside `resident` GiB in 92% of the GPU."""
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    room = 0.92 * total - resident
    mb = 1
    while mb < 16 and 2 * mb * per_sequence * 1.1 <= room:
        mb *= 2
    return mb


def compare_training(name: str, *, device: str, steps: int, micro_batch: int | None, compile_blocks: bool,
                     with_hf: bool) -> dict:  # fmt: skip
    """Megalith (fused ops, fused AdamW, bf16 on a GPU) and, `with_hf`, transformers' LlamaForCausalLM (SDPA,
    fused AdamW) on the same token batch, in this process: tokens/s of the median step, MFU, memory.

    With `micro_batch` None on a GPU, one step of each at micro-batch 1 measures the activation memory per
    sequence and the largest power of two that fits is used (halved again on out-of-memory).
    """
    import gc

    peer = sibling("peer")
    import torch

    from megalith.core import flops_per_token
    from megalith.training.memory import TrainingOutOfMemoryError
    from megalith.training.metrics import peak_tflops

    cuda = device == "cuda"
    oom = (torch.cuda.OutOfMemoryError, TrainingOutOfMemoryError)
    tmp = tempfile.mkdtemp(prefix="gpu-report-")
    seq = peer.CONFIGS[name][1]
    mb = micro_batch or (1 if cuda else peer.CONFIGS[name][2])
    base = _allocated(torch, device)
    trainer = _build_trainer(name, tmp, device=device, micro_batch=mb, compile_blocks=compile_blocks)
    vocab = trainer.model_config.vocab_size
    contenders: dict[str, _Stepper] = {}
    if with_hf:
        with torch.device(device):  # built (and initialised) where it runs, not on the host first
            hf = peer.hf_model(trainer.cfg, device)
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda or None)
        ids: list = [None]

        def hf_step():
            hf(input_ids=ids[0], labels=ids[0]).loss.backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)

        contenders["transformers"] = _Stepper(torch, device, hf_step)
    batch: list = [None]
    contenders["megalith"] = _Stepper(torch, device, lambda: trainer.train_step(batch))

    def draw(n: int) -> None:
        g = torch.Generator().manual_seed(n)
        tokens = torch.randint(0, vocab, (n, seq + 1), generator=g).to(device)
        batch[0] = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if with_hf:
            ids[0] = tokens[:, :-1].contiguous()

    draw(mb)
    for stepper in contenders.values():  # first step: optimizer state appears, kernels load
        stepper(timed=False)
        stepper.activation_peak = 0.0
        stepper(timed=False)  # the second step's peak is the activations alone
    resident = _allocated(torch, device) - base
    if cuda and micro_batch is None:
        per_sequence = max(s.activation_peak for s in contenders.values())
        mb = _largest_micro_batch(torch, resident, per_sequence)
    while True:
        try:
            if mb != trainer.cfg.training.micro_batch_size:
                trainer.close()
                trainer = None  # free the old model before building the new one (the step closure reads `trainer`)
                gc.collect()
                torch.cuda.empty_cache()
                trainer = _build_trainer(name, tmp, device=device, micro_batch=mb, compile_blocks=compile_blocks)
            draw(mb)
            for i in range(2 + steps):
                for stepper in contenders.values():
                    stepper(timed=i >= 2)
            break
        except oom:
            if mb == 1:
                raise
            if with_hf:
                hf_opt.zero_grad(set_to_none=True)
        mb //= 2
        for stepper in contenders.values():
            stepper.seconds, stepper.activation_peak = [], 0.0
    result = _training_result(torch, name, seq, mb, trainer, contenders, flops_per_token, peak_tflops)
    result.update(compile=compile_blocks, resident_gib=_allocated(torch, device) - base)
    trainer.close()
    return result


def _training_result(torch, name, seq, mb, trainer, contenders, flops_per_token, peak_tflops) -> dict:
    import statistics

    cuda = trainer.device.type == "cuda"
    peak = peak_tflops(torch.cuda.get_device_name(0), "bf16") if cuda else None
    flops = flops_per_token(trainer.model_config, seq)
    rows = {}
    for label, stepper in contenders.items():
        tokens_per_s = mb * seq / statistics.median(stepper.seconds)
        rows[label] = {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops / (peak * 1e12) if peak else None,
                       "activation_peak_gib": stepper.activation_peak if cuda else None}  # fmt: skip
    return {"model": name, "seq_len": seq, "micro_batch": mb, "peak_tflops": peak,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "contenders": rows}  # fmt: skip


def _training_table(rec: Record, result: dict, title: str) -> None:
    rows = []
    hf = result["contenders"].get("transformers")
    for label, r in result["contenders"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        act = f"{r['activation_peak_gib']:.1f}" if r["activation_peak_gib"] is not None else "-"
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        rows.append([label, result["micro_batch"], f"{r['tokens_per_s']:,.0f}", mfu, act, ratio])
    rec.table(title, ["contender", "micro-batch", "tokens/s", "MFU", "activation peak GiB", "vs transformers"], rows)
    if result["resident_gib"] == result["resident_gib"]:  # not NaN: a GPU
        rec.note(f"{title.split(',')[0]}: {result['resident_gib']:.1f} GiB resident between steps (weights, gradients "
                 f"and optimizer state of every contender in the process); MFU against {result['peak_tflops']} "
                 "TFLOP/s bf16 dense")  # fmt: skip


def section_training(rec: Record, opts) -> None:
    """Megalith against transformers' LlamaForCausalLM on one GPU (or the CPU with --device cpu)."""
    if opts.device == "cuda":
        _need_gpu()
    result = compare_training(opts.model, device=opts.device, steps=opts.steps, micro_batch=opts.micro_batch,
                              compile_blocks=False, with_hf=True)  # fmt: skip
    rec.data("training", result)
    _training_table(rec, result, f"{opts.model}, seq {result['seq_len']}, {result['device']}: Megalith (fused ops) "
                    "vs transformers (SDPA), AdamW fused on a GPU, median step")  # fmt: skip


def section_training_compiled(rec: Record, opts) -> None:
    """Megalith with compiled blocks (runtime.compile=true) at the micro-batch the training section found."""
    if opts.device == "cuda":
        _need_gpu()
    result = compare_training(opts.model, device=opts.device, steps=opts.steps, micro_batch=opts.micro_batch,
                              compile_blocks=True, with_hf=False)  # fmt: skip
    rec.data("training_compiled", result)
    _training_table(rec, result, f"{opts.model}, seq {result['seq_len']}: Megalith with compiled blocks (the first "
                    "two steps, which compile, are not timed)")  # fmt: skip
