"""``tokenmerge bench``: latency, peak memory and FLOP ratio of methods against the unaccelerated model.

Timing follows ``benchmarks/unet_cpu.py``: after warm-up, each round runs every configuration once in turn
(interleaved, so drift in clock speed or load hits all alike) and the median over rounds is reported. A configuration
is applied before its call and removed after it, outside the timed region. Latency is measured with CUDA events on
a GPU and ``time.perf_counter`` on the CPU. Peak memory is measured in a separate, untimed call: on a GPU the growth
of ``torch.cuda.max_memory_allocated`` over what was allocated before the call; on the CPU the growth of the
process' resident set size (psutil), sampled every millisecond by a thread — an approximation that misses
allocations shorter than the sampling period and memory the allocator reuses.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import tokenmerge as tm
from tokenmerge.errors import HarnessError
from tokenmerge.flops import count_flops
from tokenmerge.harness.registry import MethodSpec
from tokenmerge.harness.timing import time_call


@dataclass
class Target:
    """What a benchmark calls: ``run()`` is one measured call; ``model`` is what methods are applied to."""

    name: str
    kind: str  # "denoiser" or "pipeline"
    model: Any
    run: Callable[[], torch.Tensor]
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)


def denoiser_target(
    name: str,
    model: torch.nn.Module,
    inputs: dict[str, Any],
    device: torch.device,
    call: Callable[..., Any] | None = None,
) -> Target:
    """One forward of a bare denoiser; every call starts a new generation (worst case for plan reuse). ``call``
    (default ``model``) is what is called, e.g. ``torch.compile(model)``; methods are applied to ``model``."""
    model.to(device)
    inputs = {k: _to(v, device) for k, v in inputs.items()}
    call = model if call is None else call

    def run() -> torch.Tensor:
        if hasattr(model, "_tokenmerge"):
            tm.set_step(model, 0)  # a new generation, without reading the timestep (compiled calls: no sync)
        with torch.inference_mode():
            return call(**inputs, return_dict=False)[0]

    return Target(name, "denoiser", model, run, device)


def pipeline_target(
    name: str, pipe: Any, prompt: str, steps: int, height: int | None, width: int | None, device: torch.device
) -> Target:
    """One stock pipeline call (fixed seed, latent output: the VAE decode is not what methods change)."""
    pipe.to(device)
    extra = {k: v for k, v in dict(height=height, width=width).items() if v is not None}

    def run() -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(0)
        with torch.inference_mode():
            out = pipe(prompt, num_inference_steps=steps, generator=generator, output_type="latent", **extra)
        return out.images if isinstance(out.images, torch.Tensor) else torch.as_tensor(out.images)

    return Target(name, "pipeline", pipe, run, device, dict(prompt=prompt, steps=steps, **extra))


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(run: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    """(MiB, how it was measured) of the memory growth during one call of ``run``."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda_max_allocated"
    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return (peak[0] - before) / 2**20, "cpu_rss_growth"


def _apply(target: Target, spec: MethodSpec) -> None:
    if spec.method is None:
        return
    try:
        tm.apply(target.model, spec.method)
    except (ValueError, TypeError) as exc:
        raise HarnessError(f"cannot apply {spec.label} to {target.name}: {exc}") from exc


def _remove(target: Target, spec: MethodSpec) -> None:
    if spec.method is not None:
        tm.remove(target.model)


def run_bench(
    target: Target,
    specs: Sequence[MethodSpec],
    rounds: int = 5,
    warmup: int = 1,
    flops: bool = True,
    memory: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark ``specs`` (the baseline is added first if absent) on ``target``; one result row per spec."""
    from tqdm.auto import tqdm

    specs = list(specs)
    if not any(s.method is None for s in specs):
        specs.insert(0, MethodSpec("baseline", None))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        raise HarnessError(f"duplicate --method entries: {', '.join(dupes)}")
    outputs: dict[str, torch.Tensor] = {}
    flop_counts: dict[str, int] = {}
    mem: dict[str, tuple[float, str]] = {}
    times: dict[str, list[float]] = {s.label: [] for s in specs}
    total = len(specs) * (rounds + (1 if flops else 0) + (1 if memory else 0))
    with tqdm(total=total, desc=f"bench {target.name}", disable=not progress, leave=False) as bar:
        for spec in specs:  # warm-up, reference outputs, FLOPs and memory
            _apply(target, spec)
            try:
                for _ in range(max(warmup, 1)):
                    outputs[spec.label] = target.run().float().cpu()
                if flops:
                    flop_counts[spec.label] = count_flops(target.run)
                    bar.update()
                if memory:
                    mem[spec.label] = peak_memory(target.run, target.device)
                    bar.update()
            finally:
                _remove(target, spec)
        for _ in range(rounds):
            for spec in specs:
                _apply(target, spec)
                try:
                    times[spec.label].append(time_call(target.run, target.device))
                finally:
                    _remove(target, spec)
                bar.update()
    base = specs[0] if specs[0].method is None else next(s for s in specs if s.method is None)
    base_t = statistics.median(times[base.label])
    base_out = outputs[base.label]
    rows = []
    for spec in specs:
        t = statistics.median(times[spec.label])
        dev = (outputs[spec.label] - base_out).norm() / base_out.norm().clamp_min(1e-12)
        row: dict[str, Any] = dict(
            config=spec.label,
            method=type(spec.method).__name__ if spec.method is not None else "none",
            median_ms=round(t * 1000, 3),
            min_ms=round(min(times[spec.label]) * 1000, 3),
            speedup=round(base_t / t, 4),
            gflops=round(flop_counts[spec.label] / 1e9, 4) if flops else None,
            flop_ratio=round(flop_counts[base.label] / flop_counts[spec.label], 4) if flops else None,
            peak_mem_mib=round(mem[spec.label][0], 2) if memory else None,
            mem_kind=mem[spec.label][1] if memory else None,
            rel_l2_deviation=round(float(dev), 6),
            times_ms=[round(x * 1000, 3) for x in times[spec.label]],
        )
        rows.append(row)
    return rows
