"""Every GPU figure in one call: tests, attention kernels, end-to-end step, cache, AOTInductor.

    python bench/gpu.py --out DIR [--dry-run] [--budget-s 540] [--only PART ...]

Runs the parts of `gpu_parts.PARTS` in order (``pytest``, ``attention``, ``end-to-end``,
``cache``, ``aoti``), each in its own worker process with its own time share, and writes
``DIR/gpu.json`` (every figure, raw), ``DIR/gpu.md`` (the tables) and ``DIR/gpu.log`` (all output).

Time shares: a part gets at least its estimate and at most 1.5 times it, taking from the
budget only what the later parts' estimates leave; a part whose estimate exceeds what is left
is skipped, and the output says so. A part running past its share is stopped (its process
group: SIGTERM, then SIGKILL) and keeps the rows it had measured: workers save their results
after every row. The GPU is only ever touched by the workers, one at a time, so a CUDA error
or a hang ends with its process and cannot leak into the next part; ``nvidia-smi`` is read
before and after.

``--dry-run`` runs every part at tiny size on the CPU (``CUDA_VISIBLE_DEVICES`` emptied): the
same scripts and functions with smaller shapes, our Triton kernel in Triton's interpreter, so
that this script cannot rot between GPU sessions (tests/test_bench_gpu.py runs it).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(ROOT))

from gpu_parts import PARTS, Part  # noqa: E402
from part_result import Column, PartResult, Table  # noqa: E402

DEFAULT_BUDGET_S = 540.0
SLACK = 1.5
"""A part may run up to this times its estimate when the later parts leave the time."""
RESERVE_S = 5.0
"""Kept back from the budget for writing the results."""
KILL_GRACE_S = 10.0


def share_for(estimate_s: float, remaining_s: float, later_estimates_s: Sequence[float]) -> float:
    """The time share of a part: its estimate, plus what the later parts' estimates leave (up to
    `SLACK` times the estimate), never more than remains. Below the estimate means: skip it."""
    spare = remaining_s - sum(later_estimates_s)
    return min(remaining_s, max(estimate_s, min(spare, SLACK * estimate_s)))


@dataclass
class WorkerRun:
    returncode: int | None
    timed_out: bool
    wall_s: float


def _pump(stream: IO[str], prefix: str, log: IO[str]) -> None:
    for line in stream:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()
        log.write(prefix + line)
        log.flush()


def _stop_group(process: subprocess.Popen) -> None:
    """End the worker and everything it started (its own process group), gently first.

    Bounded: a process stuck in the driver past SIGKILL's grace is left to the machine's end."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=KILL_GRACE_S)
            if sig == signal.SIGTERM:
                os.killpg(process.pid, signal.SIGKILL)  # children that ignored SIGTERM
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def run_worker(command: Sequence[str], env: dict[str, str], timeout_s: float, log: IO[str],
               prefix: str = "") -> WorkerRun:
    """Run `command` in a new process group, echoing its output to stdout and `log` with `prefix`;
    stop the whole group at `timeout_s`. Nothing it started is left running."""
    start = time.perf_counter()
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=ROOT, process_group=0, bufsize=1, errors="replace")
    pump = threading.Thread(target=_pump, args=(process.stdout, prefix, log), daemon=True)
    pump.start()
    timed_out = False
    try:
        process.wait(timeout=max(timeout_s, 0.0))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _stop_group(process)  # also after a normal exit: a worker's leftover children go too
    pump.join(timeout=KILL_GRACE_S)
    return WorkerRun(None if timed_out else process.returncode, timed_out, time.perf_counter() - start)


def _nvidia_smi() -> dict[str, str] | None:
    """The card's state as nvidia-smi reports it (None where there is no nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    queries = {"gpu": ["--query-gpu=name,memory.used,memory.total,utilization.gpu,temperature.gpu,clocks.sm,"
                       "clocks.max.sm,power.draw", "--format=csv,noheader"],
               "compute_apps": ["--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"]}
    state = {}
    for key, args in queries.items():
        try:
            answer = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
            state[key] = answer.stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            state[key] = f"nvidia-smi failed: {error}"
    return state


def _worker_env(part: Part, dry: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if dry:
        env.update(part.dry_env, CUDA_VISIBLE_DEVICES="")
    return env


def _failures(part_result: PartResult | None) -> int:
    if part_result is None:
        return 0
    counts = part_result.details.get("counts", {})
    return int(counts.get("failed", 0)) + int(counts.get("error", 0))


STATUS_COLUMNS = [Column("part", "part"), Column("status", "status"), Column("wall_s", "wall s", "{:.0f}"),
                  Column("share_s", "share s", "{:.0f}"), Column("estimate_s", "estimate s", "{:.0f}"),
                  Column("reason", "note")]


def run_parts(parts: Sequence[Part], out: Path, *, dry: bool, budget_s: float) -> dict:
    """Run `parts` in order within `budget_s`; write gpu.json, gpu.md and gpu.log under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    report: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "dry_run": dry, "budget_s": budget_s,
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "host": platform.node(), "gpu_before": _nvidia_smi(), "parts": []}
    estimates = [part.estimate_s(dry) for part in parts]
    with open(out / "gpu.log", "w") as log, tempfile.TemporaryDirectory(prefix="t4dopt-gpu-") as scratch:
        for index, part in enumerate(parts):
            remaining = budget_s - RESERVE_S - (time.perf_counter() - began)
            share = share_for(estimates[index], remaining, estimates[index + 1:])
            entry = {"name": part.name, "title": part.title, "command": part.command(dry),
                     "estimate_s": estimates[index], "share_s": max(share, 0.0), "wall_s": None, "reason": None,
                     "result": None}
            report["parts"].append(entry)
            if share < estimates[index]:
                entry.update(status="skipped", reason=f"estimated {estimates[index]:.0f} s, but only "
                             f"{max(remaining, 0):.0f} s of the budget remain")
                line = f"[gpu] {part.name}: SKIPPED, it would overrun its share ({entry['reason']})\n"
                sys.stdout.write(line)
                log.write(line)
                continue
            line = (f"[gpu] {part.name}: starting, estimate {estimates[index]:.0f} s, share {share:.0f} s, "
                    f"{remaining:.0f} s of the budget left\n")
            sys.stdout.write(line)
            log.write(line)
            sys.stdout.flush()
            result_path = Path(scratch) / f"{part.name}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", part.name, "--result",
                       str(result_path)] + (["--dry-run"] if dry else [])
            worker = run_worker(command, _worker_env(part, dry), share, log, prefix=f"[{part.name}] ")
            result = PartResult.load(result_path) if result_path.exists() else None
            entry["wall_s"] = worker.wall_s
            if worker.timed_out:
                entry.update(status="timeout",
                             reason=f"stopped at its share of {share:.0f} s; the rows it measured are kept")
            elif worker.returncode != 0:
                entry.update(status="failed", reason=f"worker exit code {worker.returncode}: see gpu.log")
            elif _failures(result):
                entry.update(status="failed", reason=f"{_failures(result)} tests failed")
            else:
                entry["status"] = "ok"
            entry["result"] = result.to_json() if result else None
            if result and result.environment and "environment" not in report:
                report["environment"] = result.environment
            line = f"[gpu] {part.name}: {entry['status']} after {worker.wall_s:.0f} s\n"
            sys.stdout.write(line)
            log.write(line)
            _write(report, out, began)  # after every part: a run stopped from outside keeps the parts it finished
    report["gpu_after"] = _nvidia_smi()
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write(report, out, began)
    return report


def _write(report: dict, out: Path, began: float) -> None:
    report["wall_s"] = time.perf_counter() - began
    for name, text in (("gpu.json", json.dumps(report, indent=1, default=str)), ("gpu.md", markdown(report))):
        scratch = out / f".{name}.tmp"
        scratch.write_text(text)
        scratch.replace(out / name)


def _status_table(report: dict) -> Table:
    return Table("status", STATUS_COLUMNS, [{"part": p["name"], **p} for p in report["parts"]])


def markdown(report: dict) -> str:
    """The whole run as Markdown: header, status of every part, then each part's tables and notes."""
    env = report.get("environment", {})
    lines = [f"# GPU figures{' (dry run, CPU)' if report['dry_run'] else ''}", "",
             f"{report['started']}, {env.get('device', 'device unknown')}, torch {env.get('torch', '?')}, "
             f"triton {env.get('triton', '?')}, CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}, "
             f"flash-attn-4 {env.get('flash-attn-4') or 'not installed'}; `{report['command']}`; "
             f"budget {report['budget_s']:.0f} s, wall {report['wall_s']:.0f} s.", "",
             _status_table(report).markdown()]
    for key in ("gpu_before", "gpu_after"):
        if report.get(key):
            lines += ["", f"nvidia-smi {key.removeprefix('gpu_')}: {report[key]['gpu']}; compute apps: "
                      f"{report[key]['compute_apps'] or 'none'}"]
    for part in report["parts"]:
        lines += ["", f"## {part['title']}", "", f"`{part['command']}` ({part['status']}"
                  + (f": {part['reason']}" if part.get("reason") else "") + ")"]
        if part.get("result"):
            body = PartResult()
            body.tables = [Table.from_json(t) for t in part["result"]["tables"]]
            body.notes = part["result"]["notes"]
            lines += ["", body.markdown()]
    unmeasured = [p["name"] for p in report["parts"] if p["status"] != "ok"]
    lines += ["", "Not measured in this run (skipped, stopped or failed): " + (", ".join(unmeasured) or "none")]
    return "\n".join(lines) + "\n"


def _worker(name: str, result_path: str, dry: bool) -> None:
    part = next(p for p in PARTS if p.name == name)
    module = importlib.import_module(part.module)
    module.main(part.argv(dry), PartResult(result_path))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu.json, gpu.md and gpu.log (required)")
    parser.add_argument("--dry-run", action="store_true", help="every part at tiny size on the CPU")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--only", nargs="+", choices=[p.name for p in PARTS], metavar="PART",
                        help=f"run only these parts, in the usual order: {', '.join(p.name for p in PARTS)}")
    parser.add_argument("--worker", choices=[p.name for p in PARTS], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and args.out is None:
        parser.error("--out DIR is required")
    if args.budget_s <= RESERVE_S:
        parser.error(f"--budget-s {args.budget_s:g}: must exceed the {RESERVE_S:g} s kept for writing the results")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args.worker, args.result, args.dry_run)
        return 0
    parts = [p for p in PARTS if not args.only or p.name in args.only]
    report = run_parts(parts, args.out, dry=args.dry_run, budget_s=args.budget_s)
    print()
    print(markdown(report))
    print(_status_table(report).markdown())
    print(f"\nwrote {args.out / 'gpu.json'}, {args.out / 'gpu.md'}, {args.out / 'gpu.log'}")
    return 0 if all(p["status"] in ("ok", "skipped") for p in report["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
