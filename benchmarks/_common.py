"""Shared helpers for the benchmark scripts: threads, timing, peak memory, tables, docs sections.

Every script in benchmarks/ follows the same recipe:

    threads = set_threads(N)                     # the same thread count for ours and the reference
    times = time_alternating({"ours": f, "peft": g}, warmup=2, repeats=10)
    mem = peak_memory(f)                         # bytes allocated above the starting point
    table = markdown_table(["case", "ours ms", "peft ms", "ours/peft"], rows)
    write_section("step", header(threads) + table)  # rewrites only <!-- bench:step --> ... in docs

Timing alternates the candidates inside every round (ours, ref, ref, ours, ...) so slow drift of
a shared machine hits both sides alike; results are medians.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH_DOC = ROOT / "docs" / "benchmarks.md"
if str(ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py` from a plain checkout
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------ set-up
def set_threads(n: int | None = None) -> int:
    """Pin torch's intra-op thread count (default: all cores, capped at 8) and return it.

    Both candidates of a comparison run in one process, so they share this setting.
    """
    if n is None:
        n = int(os.environ.get("BENCH_THREADS", min(os.cpu_count() or 1, 8)))
    torch.set_num_threads(n)
    return torch.get_num_threads()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_name(device: str | torch.device = "cpu") -> str:
    """A short human name of the device the numbers were taken on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:  # Linux gives a far better name than platform.processor()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} logical cores)"


def header(threads: int, device: str | torch.device = "cpu", extra: str = "") -> str:
    """One markdown paragraph: date, machine, versions, threads (goes above each table)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = ", ".join(f"{d} {_version(d)}" for d in
                         ("torch", "transformers", "peft", "bitsandbytes"))
    clock = "wall" if torch.device(device).type == "cuda" else _clock["name"]
    load = ""
    if hasattr(os, "getloadavg") and torch.device(device).type == "cpu":
        load = f" · load average {os.getloadavg()[0]:.1f}"
    text = (f"_{now} · {device_name(device)}{load} · torch threads: {threads} · {clock} clock · "
            f"Python {platform.python_version()} · {versions}_")
    return text + (f"\n\n{extra}" if extra else "")


def fixed_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, seq) drawn from a private generator: the same on every run."""
    gen = torch.Generator().manual_seed(seed)
    # ids >= 3 avoid the usual special ids (pad/bos/eos) without knowing the tokenizer
    return torch.randint(3, vocab, (batch, seq), generator=gen)


# ------------------------------------------------------------------------------------ timing
def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# "wall": elapsed time. "cpu": CPU seconds of this process (all its threads), which a busy
# shared machine inflates far less; with --threads 1 it is the work done, free of waiting.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = {"name": "wall"}


def set_clock(name: str) -> str:
    """Choose the clock of every later timing: "wall" (default) or "cpu"."""
    if name not in CLOCKS:
        raise ValueError(f"clock={name!r}; expected one of {sorted(CLOCKS)}")
    _clock["name"] = name
    return name


def time_once(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Seconds of one call on the chosen clock (CUDA work is synchronized on both ends)."""
    now = CLOCKS["wall" if torch.device(device).type == "cuda" else _clock["name"]]
    _sync(device)
    t0 = now()
    fn()
    _sync(device)
    return now() - t0


def time_alternating(fns: Mapping[str, Callable[[], object]], warmup: int = 2,
                     repeats: int = 10, device: str | torch.device = "cpu",
                     ) -> dict[str, list[float]]:
    """Time several candidates in one process, alternating their order every round.

    Args:
        fns: name -> zero-argument callable doing one unit of work (e.g. one training step).
        warmup: untimed rounds first (allocator, caches, lazy inits, autotuning).
        repeats: timed rounds; each candidate runs once per round.
        device: where the work runs (CUDA is synchronized around every call).
    Returns:
        name -> list of `repeats` wall times in seconds.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        # forward order on even rounds, reverse on odd: no candidate always runs first
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(time_once(fns[name], device))
    return times


def median_ms(times: Sequence[float]) -> float:
    """Median of a list of seconds, in milliseconds."""
    return 1000.0 * statistics.median(times)


def ratio(ours: float, ref: float) -> str:
    """'0.93x' style ratio ours/reference (lower is better for times and memory)."""
    return f"{ours / ref:.2f}x" if ref > 0 else "n/a"


# ------------------------------------------------------------------------------------ memory
def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated by torch during one call, above what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: torch has no allocator statistics, and
    tracemalloc / ru_maxrss do not see tensor storage (or only the process-wide high-water
    mark), so the profiler's allocation events are replayed in time order instead.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:  # nbytes > 0: allocation, < 0: free
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


# ------------------------------------------------------------------------------------ output
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers are printed as given (format them beforehand)."""
    lines = ["| " + " | ".join(map(str, headers)) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def section_text(text: str, name: str) -> str:
    """The block between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in `text` ("" if absent)."""
    start, end = _markers(name)
    i, j = text.find(start), text.find(end)
    return text[i + len(start):j] if 0 <= i < j else ""


def replace_section(text: str, name: str, body: str) -> str:
    """Return `text` with the block between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`
    replaced by `body`; the markers are appended at the end when absent."""
    start, end = _markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        return text[:i] + block + text[j + len(end):]
    if i >= 0 or j >= 0:
        raise ValueError(f"docs section {name!r} has only one of its two markers")
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_section(name: str, body: str, path: str | os.PathLike = BENCH_DOC) -> Path:
    """Rewrite one named section of docs/benchmarks.md (atomically); other sections stay.

    Args:
        name: section id, e.g. "step" -> markers `<!-- bench:step -->` / `<!-- /bench:step -->`.
        body: markdown to place between the markers (a title, `header(...)`, a table...).
        path: the markdown file (default docs/benchmarks.md).
    Returns:
        The path written.
    """
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    _atomic_write(path, replace_section(old, name, body))
    return path


def emit(name: str, title: str, threads: int, table: str, notes: str = "",
         device: str | torch.device = "cpu", write: bool = True, show: bool = True) -> str:
    """Print a result table (unless show=False) and (unless write=False) put it in its docs
    section. Returns the markdown body.
    """
    body = f"### {title}\n\n{header(threads, device)}\n\n{table}\n"
    if notes:
        body += f"\n{notes.strip()}\n"
    if show:
        print(body)
    if write:
        write_section(name, body)
    return body


def bench_args(description: str, repeats: int, warmup: int = 1):
    """An argparse parser with the knobs every script shares.

    --quick: tiny models, few repeats (CI-sized; does not touch the docs unless --write);
    --threads N; --device cpu|cuda; --repeats N; --warmup N; --no-write / --write.
    """
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny models, few repeats (CI-sized)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores, <= 8)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                   help="wall (default) or cpu: process CPU seconds, steadier on a busy machine")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds per candidate")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    p.add_argument("--no-write", dest="write", action="store_false", default=None,
                   help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--write", dest="write", action="store_true",
                   help="write docs/benchmarks.md even with --quick")
    return p


def should_write(args) -> bool:
    """Default: full runs write their docs section, --quick runs do not."""
    return (not args.quick) if args.write is None else args.write


def section_name(base: str, backbone: str, device: str = "cpu") -> str:
    """Docs section of one backbone's table, e.g. "step-minilm" or "floor-smollm2-gpu"."""
    return f"{base}-{backbone}" + ("" if device == "cpu" else "-gpu")


def setup(args) -> int:
    """Apply the shared knobs (clock, threads); returns the thread count."""
    set_clock(args.clock)
    return set_threads(args.threads)
