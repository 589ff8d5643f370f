"""The GPU report: one command on a bare GPU machine builds Megalith, runs its GPU tests and benchmarks, and writes
gpu-report.json and gpu-report.md into $OUT (default ./gpu-report), with a log of everything beside them.

    make gpu-carry                                    # here (where hatchling is): the pure-Python wheels
    python3 benchmarks/gpu_report.py                  # there (or `make gpu-report`): the whole report
    python3 benchmarks/gpu_report.py --dry-run        # the plan and the output format, no GPU needed

Sections, in order (each in its own process, stopped at its time limit, its failure recorded and the next run):
environment (versions, driver, copy bandwidth, bf16 matmul rate), build (megalith-kernels for this GPU's arch
only, plus the carried wheels), tests (the cuda-marked tests, per file and per test time limits), kernels (fused
ops forward and backward vs torch eager and SDPA at llama3-8b sizes), attention (vs SDPA flash/cuDNN/efficient),
comm (the direct NCCL communicator, world size 1), fp8 (when benchmarks/fp8.py exists), training (llama3-1b at
seq 4096, bf16, the largest micro-batch that fits: Megalith vs transformers' LlamaForCausalLM in one process) and
training-compiled (the same with runtime.compile=true), moe (grouped GEMM vs a loop per expert, tiny-moe
tokens/s) and context (llama3-1b at 32k tokens, whole sequence vs 8 packed documents). A global budget (--budget)
stops the run before the machine's limit: a section starts only with its minimum time left, and the report is
rewritten after each one; the last sections usually need a second call (`--sections moe context`).
Exit code 0 when every section that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import gpu_sections as gs


@dataclass(frozen=True)
class Section:
    name: str
    limit_s: float  # at most this long
    minimum_s: float  # not started with less than this left
    run: object


SECTIONS = [
    Section("environment", 60, 10, gs.section_environment),
    Section("build", 240, 60, gs.section_build),
    Section("tests", 150, 30, gs.section_tests),
    Section("kernels", 90, 30, gs.section_kernels),
    Section("attention", 90, 30, gs.section_attention),
    Section("comm", 45, 15, gs.section_comm),
    Section("fp8", 45, 15, gs.section_fp8),
    Section("training", 180, 60, gs.section_training),
    Section("training-compiled", 150, 60, gs.section_training_compiled),
    Section("moe", 60, 30, gs.section_moe),
    Section("context", 120, 60, gs.section_context),
]
BY_NAME = {s.name: s for s in SECTIONS}
RESERVE_S = 10  # kept for writing the report after the last section


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-report", help="output folder (default: $OUT)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole report (default 420)")
    p.add_argument("--sections", nargs="+", choices=list(BY_NAME), help="run only these (in the usual order)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=SECONDS", help="a section's time limit")
    p.add_argument("--dry-run", action="store_true", help="plan and write the report without measuring anything")
    p.add_argument("--prepare-carry", action="store_true", help="build the wheels of .gpu-carry here and exit")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions of each kernel measurement")
    p.add_argument("--steps", type=int, default=6, help="timed training steps of each contender")
    p.add_argument("--model", default="llama3-1b", help="the benchmarks/peer.py configuration of the training sections")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device of the training sections")
    p.add_argument("--micro-batch", type=int, default=None, help="training micro-batch (default: the largest fitting)")
    p.add_argument("--test-timeout", type=float, default=60.0, help="seconds one GPU test may run")
    p.add_argument("--child", choices=list(BY_NAME), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--time-left", type=float, default=600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    limits = {}
    for item in args.limit:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in BY_NAME or seconds <= 0:
            p.error(f"--limit {item!r}: expected NAME=SECONDS with NAME one of {', '.join(BY_NAME)}")
        limits[name] = seconds
    args.limits = limits
    return args


# ---- one section, in its own process ----------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> int:
    """Runs one section and leaves its record (with "status" and, on failure, "error") at args.result."""
    rec = gs.Record(args.result)
    section = BY_NAME[args.child]
    started = time.monotonic()
    try:
        if args.dry_run:
            rec.note("plan: " + " ".join(section.run.__doc__.split()))
            rec.body["status"] = "planned"
        else:
            section.run(rec, args)
            rec.body["status"] = "ok"
    except Exception as exc:
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        rec.body.update(status="failed", error=f"{type(exc).__name__}: {first}"[:400])
    rec.body["seconds"] = round(time.monotonic() - started, 1)
    rec.save()
    return 0


def _run_child(section: Section, args: argparse.Namespace, limit: float, log) -> dict:
    """The section's record, run in a child process group that is killed at `limit` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, __file__, "--child", section.name, "--result", result, "--time-left", f"{limit:.0f}",
               "--repeats", str(args.repeats), "--steps", str(args.steps), "--model", args.model, "--device",
               args.device, "--test-timeout", str(args.test_timeout), "--out", os.path.abspath(args.out)]  # fmt: skip
        if args.micro_batch:
            cmd += ["--micro-batch", str(args.micro_batch)]
        if args.dry_run:
            cmd.append("--dry-run")
        log.write(f"\n===== {section.name} (limit {limit:.3g} s) =====\n")
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the section's own children (pip, cmake, pytest) too
            proc.wait()
            timed_out = True
        elapsed = round(time.monotonic() - start, 1)
        try:
            record = json.loads(Path(result).read_text())
        except (OSError, ValueError):
            record = {"tables": [], "text": [], "notes": [], "data": {}}
    if timed_out:
        record.update(status="timed out", error=f"stopped at its {limit:.3g} s limit (what it measured is kept)")
    elif "status" not in record:
        record.update(status="failed", error=f"the section's process exited {proc.returncode} (see gpu-report.log)")
    record["seconds"] = elapsed
    return record


# ---- the whole report -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = _parse(argv)
    if args.child:
        return child_main(args)
    if args.prepare_carry:
        gs.prepare_carry()
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in SECTIONS if not args.sections or s.name in args.sections]
    report = {"title": "Megalith GPU report", "started": _now(), "budget_s": args.budget, "dry_run": args.dry_run,
              "options": {"model": args.model, "device": args.device, "repeats": args.repeats, "steps": args.steps},
              "sections": {}}  # fmt: skip
    print(f"plan ({args.budget:.0f} s budget): " + ", ".join(f"{s.name} <= {_limit(s, args):.0f} s" for s in chosen))
    start = time.monotonic()
    with open(out / "gpu-report.log", "a", encoding="utf-8") as log:
        for section in chosen:
            left = args.budget - (time.monotonic() - start) - RESERVE_S
            limit = min(_limit(section, args), left)
            if limit < min(section.minimum_s, _limit(section, args)):
                record = {"status": "skipped", "error": f"the time budget left {max(left, 0):.0f} s, the section "
                          f"needs {section.minimum_s:.0f} s", "seconds": 0.0}  # fmt: skip
            else:
                if section.name == "training-compiled" and not args.micro_batch:
                    args.micro_batch = _found_micro_batch(report)
                record = _run_child(section, args, limit, log)
                if section.name == "training-compiled":
                    args.micro_batch = None
            report["sections"][section.name] = record
            print(f"{section.name}: {record['status']} ({record['seconds']:.0f} s)"
                  + (f": {record['error']}" if record.get("error") else ""), flush=True)  # fmt: skip
            _write(report, out)
    report["finished"] = _now()
    report["seconds"] = round(time.monotonic() - start, 1)
    markdown = _write(report, out)
    print("\n" + markdown)
    bad = [n for n, r in report["sections"].items() if r["status"] not in ("ok", "planned")]
    return 1 if bad else 0


def _limit(section: Section, args) -> float:
    return args.limits.get(section.name, section.limit_s)


def _found_micro_batch(report: dict) -> int | None:
    training = report["sections"].get("training", {}).get("data", {}).get("training")
    return training["micro_batch"] if training else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write(report: dict, out: Path) -> str:
    """Writes gpu-report.json and gpu-report.md (each through a temporary name); returns the markdown."""
    markdown = render_markdown(report)
    for name, text in (("gpu-report.json", json.dumps(report, indent=1, default=str)), ("gpu-report.md", markdown)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, out / name)
    return markdown


def render_markdown(report: dict) -> str:
    """The report as markdown: a header line of versions, a status table, then each section's tables and text."""
    env = report["sections"].get("environment", {}).get("data", {}).get("environment", {})
    facts = [f"{k} {env[k]}" for k in ("gpu", "driver", "torch", "cuda", "commit") if env.get(k)]
    lines = [f"# {report['title']}" + (" (dry run)" if report["dry_run"] else ""), "",
             f"{report['started']}" + (" · " + " · ".join(facts) if facts else ""), "",
             "| section | status | seconds | note |", "|---|---|---|---|"]  # fmt: skip
    for name, rec in report["sections"].items():
        note = (rec.get("error") or "; ".join(rec.get("notes", [])[:1])).replace("|", "/")
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']:.0f} | {note} |")
    for name, rec in report["sections"].items():
        if not (rec.get("tables") or rec.get("text")):
            continue
        lines += ["", f"## {name}"]
        for table in rec.get("tables", []):
            lines += ["", f"{table['title']}", "", "| " + " | ".join(table["columns"]) + " |",
                      "|" + "---|" * len(table["columns"])]  # fmt: skip
            lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in table["rows"]]
        for block in rec.get("text", []):
            lines += ["", block["title"], "", "```", block["text"], "```"]
        lines += [f"- {n}" for n in rec.get("notes", [])[1 if not rec.get("error") else 0 :]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
