"""Part (b) of the GPU check (``benchmarks/gpu_check.py``): real-size SDXL UNet and Flux-dev transformer (random
weights, bf16, 1024px): the unaccelerated model vs every method's default (``tm.ToMA()``, ``tm.ToMeSD()``,
``tm.CAToMe()``, ``tm.ToDo()``) and ToMA tokens mode at ratio 0.5 (issue #7's configuration), eager with torch SDPA
(through diffusers' ``native`` backend on Flux; the SDXL UNet's ``AttnProcessor2_0`` calls torch SDPA itself); the
unaccelerated model and ToMA tokens 0.5 with torch SDPA's FlashAttention kernel forced
(``torch.nn.attention.sdpa_kernel``; no package needed) and, with ``compiled=True``, under ``torch.compile``
(default inductor mode, static shapes). 1024px: SDXL latent 128x128 (77 text tokens), Flux packed grid 64x64 = 4096
image + 512 text tokens. Default batches: SDXL 2 (classifier-free guidance doubles it), Flux 1 (guidance-distilled).
``tiny``: tiny-sdxl (16x16 latent) and tiny-flux (16x16 grid, 8 text tokens) in fp32 on any device, as a smoke test.

Timing: every timed call is one full denoiser forward at a fixed timestep with ``tm.set_step(model, 0)`` before it
(plans from scratch: the worst case for the methods' overhead; no timestep read, so no sync in compiled calls), timed
by CUDA events on a GPU, ``time.perf_counter`` on the CPU (``tokenmerge.harness.bench.time_call``). Eager
configurations run interleaved (each round runs every one once, in turn, patch applied before and removed after the
call, outside the timed region), median over rounds. Compiled configurations cannot be interleaved that way: every
``tm.apply`` installs new hooks, on which dynamo guards, so each re-application would recompile. Each compiled
configuration is therefore timed in its own block after the eager rounds: dynamo reset, patch applied once, warm-up
calls until one compiles nothing new (``compile_s``: the time of those that compiled, at most 3), then an output call
and the rounds, none of which may compile again. A configuration that raises (a compile failure, dynamo's recompile
limit -- made an error here instead of a silent fall back to eager --, a recompile during a timed call, out of memory)
is recorded with its error and the run goes on. Peak memory: growth of ``torch.cuda.max_memory_allocated`` in one
untimed call (on the CPU: sampled RSS growth), ``tokenmerge.harness.bench.peak_memory``.

Merge overhead (ToMA in both modes, ToMeSD): R more calls of the patched model in which every call of the method's
``plan`` and of the returned plans' ``merge`` and ``unmerge`` (keys/values plans: ``kv``) is timed where it runs
(instance attributes on the method and the plans wrap them, removed afterwards): CUDA event pairs around each, read
after the forward, so nothing synchronises inside it; ``perf_counter`` on the CPU. ``overhead_share`` is the median
over the R calls of (plan + merge + unmerge or kv) / that call's time. Not counted: the hooks' Python bookkeeping, the
text-prefix concatenation around Flux spans and the per-sample rotary tables. An event pair measures the stream time
between its two points: where the GPU waits for the CPU (launch-bound), that includes launching the wrapped work.

Speedups are against the unpatched configuration of the same mode (eager SDPA, flash, compiled). Targets (issue #7,
ratio 0.5, 1024px): ``toma-tokens-0.5`` >= 1.4x, overhead <= 5% of the denoiser time, compiled ToMA's speedup over
compiled unpatched >= the eager one; checked per model and batch under ``targets``.

Budget (one H200, R = 5): per model and batch, 6 eager configurations x (warm-up, FLOP count, memory, R rounds) + R
instrumented calls for 3 of them + 2 flash x (2 + R) = 77 denoiser calls, most cheaper than an unpatched one. At
1024px an unpatched call is 6.76 TFLOP (SDXL, batch 1) and 74 TFLOP (Flux-dev, batch 1): at most 2 x 77 x 6.76 +
77 x 74 = 6,700 TFLOP, about 15 s at 450 TFLOP/s effective; the model builds (Flux-dev: 12B parameters initialised
on the GPU) take longer. Compiling real-size models (``compiled=True``) adds minutes: off by default.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from _common import print_table, summarise
from torch import nn

import tokenmerge as tm
from tokenmerge.archs import UNET_CONFIGS, build_dit, build_unet
from tokenmerge.flops import count_flops
from tokenmerge.harness.bench import denoiser_target, peak_memory, time_call
from tokenmerge.harness.models import denoiser_inputs
from tokenmerge.plans import KVPlan, MergePlan

SPEEDUP_TARGET = 1.4
OVERHEAD_TARGET = 0.05
#: Every block of both kinds.
FLUX_ALL = {"double": (0, None), "single": (0, None)}
#: The configuration the targets are checked on: ToMA tokens mode at ratio 0.5 (issue #7).
TOMA_TOKENS = "toma-tokens-0.5"
#: Configurations whose merge overhead is measured.
OVERHEAD = frozenset({TOMA_TOKENS, "toma", "tomesd"})
#: What a plan does per merged sub-module: merge and unmerge tokens, or (keys/values plans) gather the kept keys.
PLAN_WORK = {MergePlan: ("merge", "unmerge"), KVPlan: ("kv",)}
COLUMNS = ("median_s", "speedup", "flop_ratio", "realised", "peak_mem_mib", "overhead_share", "compile_s")


@dataclass(frozen=True)
class ModelSpec:
    """A built-in architecture and its input size: latent side (UNet) or packed grid side (Flux), text tokens."""

    arch: str
    size: int
    text: int


#: model -> (real size, tiny size)
MODELS = {
    "sdxl": (ModelSpec("sdxl", 128, 77), ModelSpec("tiny-sdxl", 16, 77)),
    "flux": (ModelSpec("flux-dev", 64, 512), ModelSpec("tiny-flux", 16, 8)),
}
#: model -> default batch sizes (SDXL runs classifier-free guidance in one batch of 2; Flux-dev is distilled).
BATCHES = {"sdxl": (2,), "flux": (1,)}


@dataclass(frozen=True)
class Config:
    """One measured configuration: a method (``None``: unpatched) in a mode (``""`` eager SDPA, ``flash`` (torch SDPA's
    FlashAttention kernel forced) or ``compiled``)."""

    label: str
    method: tm.Method | None
    mode: str = ""

    @property
    def name(self) -> str:
        return f"{self.label}@{self.mode}" if self.mode else self.label

    @property
    def reference(self) -> str:
        """The unpatched configuration of the same mode (speedups are against it)."""
        return Config("baseline", None, self.mode).name


def methods() -> dict[str, tm.Method | None]:
    """label -> method of the eager configurations: unpatched, ToMA tokens 0.5, every method's default."""
    return {
        "baseline": None,
        TOMA_TOKENS: tm.ToMA(ratio=0.5, mode="tokens"),  # UNets: whole blocks at levels <= 4x; Flux: the default
        "toma": tm.ToMA(),  # UNets: keys/values at the finest level; Flux: tokens (mode "auto")
        "tomesd": tm.ToMeSD(),
        "catome": tm.CAToMe(),
        "todo": tm.ToDo(),
    }


def configurations(flash: bool, compiled: bool) -> list[Config]:
    """Eager configurations of every method, then unpatched and ToMA tokens 0.5 with flash and compiled."""
    table = methods()
    configs = [Config(label, method) for label, method in table.items()]
    for mode, on in (("flash", flash), ("compiled", compiled)):
        configs += [Config(label, table[label], mode) for label in ("baseline", TOMA_TOKENS) if on]
    return configs


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(arch: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A built-in architecture with random weights, constructed directly on ``device`` in ``dtype`` (initialising
    Flux-dev's 12B parameters in fp32 on a CPU would take minutes and 48 GB)."""
    build = build_unet if arch in UNET_CONFIGS else build_dit
    with torch.device(device), default_dtype(dtype):
        return build(arch, dtype)


def flash_skip_reason(device: torch.device) -> str | None:
    """Why flash configurations cannot run here, or ``None`` if they can: torch's FlashAttention kernel needs a GPU
    of compute capability 8.0 or more."""
    if device.type != "cuda":
        return "torch's FlashAttention kernel is measured on CUDA only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "torch's FlashAttention kernel needs compute capability >= 8.0"
    return None


@contextlib.contextmanager
def patched(model: nn.Module, config: Config) -> Iterator[None]:
    """``model`` with the configuration's method (and, in flash mode, torch SDPA's flash kernel); undone on exit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        if config.mode == "flash":
            stack.enter_context(sdpa_kernel(SDPBackend.FLASH_ATTENTION))
        try:
            if config.method is not None:
                tm.apply(model, config.method)
            yield
        finally:
            tm.remove(model)


def describe(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message, and those of its cause if any."""

    def line(e: BaseException) -> str:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")

    return line(exc) + (f" (from {line(exc.__cause__)})" if exc.__cause__ is not None else "")


class Stopwatch:
    """Seconds of many short calls inside a longer computation: CUDA event pairs on a GPU (read after the computation,
    without synchronising inside it), ``time.perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.spans: list[Any] = []

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, timed at every call."""

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.spans.append((start, end))
            else:
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                self.spans.append(time.perf_counter() - t)
            return out

        timed.__wrapped_by__ = self
        return timed

    def total(self) -> float:
        """Seconds summed over every timed call (synchronises on a GPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1000
        return sum(self.spans)


@contextlib.contextmanager
def timed_merge_work(method: tm.Method, device: torch.device) -> Iterator[dict[str, Stopwatch]]:
    """While open, every ``method.plan`` call and every ``merge`` / ``unmerge`` (keys/values plans: ``kv``) call of the
    plans it returns is timed
    (instance attributes shadow the class' methods; the method's are removed on exit)."""
    work = PLAN_WORK[method.plan_type]
    watches = {kind: Stopwatch(device) for kind in ("plan", *work)}
    planned = watches["plan"].wrap(method.plan)

    def plan(*args: Any, **kwargs: Any) -> Any:
        result = planned(*args, **kwargs)
        for kind in work:
            fn = getattr(result, kind, None)
            if fn is not None and getattr(fn, "__wrapped_by__", None) is not watches[kind]:
                object.__setattr__(result, kind, watches[kind].wrap(fn))
        return result

    object.__setattr__(method, "plan", plan)
    try:
        yield watches
    finally:
        object.__delattr__(method, "plan")


def merge_overhead(model: nn.Module, run: Callable[[], Any], device: torch.device, rounds: int) -> dict[str, Any]:
    """The patched ``model``'s own merge work in ``rounds`` timed calls of ``run``: seconds of its method's ``plan``
    calls and of its plans' ``merge`` and ``unmerge`` (or ``kv``) calls, each timed where it runs, and of the whole call
    (medians); ``share``, the median over calls of (plan + merge + unmerge or kv) / that call's time; the number of
    each in a call."""
    method = vars(model)["_tokenmerge"].method
    seconds: dict[str, list[float]] = {"plan": [], **{kind: [] for kind in PLAN_WORK[method.plan_type]}, "call": []}
    shares = []
    for _ in range(rounds):
        with timed_merge_work(method, device) as watches:
            seconds["call"].append(time_call(run, device))
        for kind, watch in watches.items():
            seconds[kind].append(watch.total())
        shares.append(sum(watch.total() for watch in watches.values()) / seconds["call"][-1])
    calls = {f"{kind}_calls": len(watch.spans) for kind, watch in watches.items()}
    return (
        {f"{kind}_s": statistics.median(s) for kind, s in seconds.items()}
        | calls
        | dict(share=statistics.median(shares))
    )


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def graph_breaks() -> int:
    """Graph breaks dynamo has met so far in this process."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


#: Warm-up calls of a compiled configuration that may compile new graphs before it counts as failed.
COMPILE_CALLS = 3


def bench_compiled(
    model: nn.Module, inputs: dict[str, Any], config: Config, device: torch.device, rounds: int
) -> dict[str, Any]:
    """Compile warm-up, output, peak memory and timed rounds of ``torch.compile(model)`` with ``config``'s method
    applied once. Warm-up calls run until one compiles nothing new; ``compile_s`` is the time of those that did
    (``compile_calls``, at most :data:`COMPILE_CALLS`, else it raises). Raises if a later call compiles again."""
    torch._dynamo.reset()
    target = denoiser_target(config.name, model, inputs, device, call=torch.compile(model, dynamic=False))

    def checked() -> torch.Tensor:
        graphs = compiled_graphs()
        out = target.run()
        if compiled_graphs() != graphs:
            raise RuntimeError(f"recompiled on a timed call ({compiled_graphs() - graphs} new graphs)")
        return out

    graphs, breaks = compiled_graphs(), graph_breaks()
    try:
        with patched(model, config):
            compile_s, calls = 0.0, 0
            while True:
                before = compiled_graphs()
                seconds = time_call(target.run, device)
                if compiled_graphs() == before:
                    break
                compile_s, calls = compile_s + seconds, calls + 1
                if calls == COMPILE_CALLS:
                    raise RuntimeError(f"still compiling new graphs after {COMPILE_CALLS} calls")
            result = dict(
                compile_s=compile_s,
                compile_calls=calls,
                graphs=compiled_graphs() - graphs,
                graph_breaks=graph_breaks() - breaks,
            )
            result["output"] = checked().float().cpu()
            result["memory"] = peak_memory(checked, device)
            result["times"] = [time_call(checked, device) for _ in range(rounds)]
        return result
    finally:
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_group(
    model: nn.Module, inputs: dict[str, Any], configs: list[Config], device: torch.device, rounds: int
) -> list[dict[str, Any]]:
    """One result row per configuration on one model and input (see the module docstring); a configuration that
    raises gets a row with ``error`` instead of timings."""
    target = denoiser_target("eager", model, inputs, device)
    outputs: dict[str, torch.Tensor] = {}
    flops: dict[str, int] = {}
    extra: dict[str, dict[str, Any]] = {c.name: {} for c in configs}
    errors: dict[str, str] = {}
    live = [c for c in configs if c.mode != "compiled"]
    for config in list(live):  # warm-up, reference outputs, FLOPs, memory, merge overhead
        try:
            with patched(model, config):
                outputs[config.name] = target.run().float().cpu()
                if config.mode == "":
                    flops[config.name] = count_flops(target.run)
                mem, kind = peak_memory(target.run, device)
                extra[config.name].update(peak_mem_mib=round(mem, 1), mem_kind=kind)
                if config.label in OVERHEAD and config.method is not None:
                    try:
                        extra[config.name]["overhead"] = merge_overhead(model, target.run, device, rounds)
                    except Exception as exc:  # the configuration is still timed
                        extra[config.name]["overhead_error"] = describe(exc)
        except Exception as exc:
            errors[config.name] = describe(exc)
            live.remove(config)
        print(f"  warm-up {config.name}" + (f": {errors[config.name]}" if config.name in errors else ""), flush=True)
    times: dict[str, list[float]] = {c.name: [] for c in live}
    for r in range(rounds):
        for config in list(live):
            try:
                with patched(model, config):
                    times[config.name].append(time_call(target.run, device))
            except Exception as exc:
                errors[config.name] = describe(exc)
                live.remove(config)
                del times[config.name]
        print(f"  round {r + 1}/{rounds} done", flush=True)
    for config in (c for c in configs if c.mode == "compiled"):
        try:
            result = bench_compiled(model, inputs, config, device, rounds)
        except Exception as exc:
            errors[config.name] = describe(exc)
        else:
            outputs[config.name], times[config.name] = result.pop("output"), result.pop("times")
            mem, kind = result.pop("memory")
            extra[config.name].update(result, peak_mem_mib=round(mem, 1), mem_kind=kind)
        done = f": {errors[config.name]}" if config.name in errors else f" ({extra[config.name]['compile_s']:.1f} s)"
        print(f"  compiled {config.name}{done}", flush=True)
    return assemble(configs, times, outputs, flops, extra, errors)


def assemble(
    configs: list[Config],
    times: dict[str, list[float]],
    outputs: dict[str, torch.Tensor],
    flops: dict[str, int],
    extra: dict[str, dict[str, Any]],
    errors: dict[str, str],
) -> list[dict[str, Any]]:
    """Result rows in configuration order: :func:`summarise` plus mode, memory, compile time and merge overhead;
    configurations that failed, or whose reference failed, get ``error``."""
    for config in configs:
        if config.name in times and (config.reference not in times or "baseline" not in times):
            errors[config.name] = f"not compared: {config.reference} failed"
            del times[config.name]
    references = {c.name: c.reference for c in configs}
    summary = {r["config"]: r for r in summarise(times, outputs, flops, references)} if times else {}
    rows = []
    for config in configs:
        row: dict[str, Any] = dict(config=config.name, method=config.label, mode=config.mode or "eager")
        if config.name in errors:
            rows.append(dict(row, error=errors[config.name]))
            continue
        row |= summary[config.name] | extra[config.name]
        twin = Config(config.label, config.method).name
        if config.mode and twin in outputs:
            ref = outputs[twin]
            row["rel_l2_vs_eager"] = round(((outputs[config.name] - ref).norm() / ref.norm()).item(), 6)
        if "compile_s" in row:
            row["compile_s"] = round(row["compile_s"], 2)
        overhead = row.get("overhead")
        if overhead is not None:
            row["overhead"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in overhead.items()}
            row["overhead_share"] = round(overhead["share"], 4)
        rows.append(row)
    return rows


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and batch: ToMA 0.5's eager speedup, overhead share and compiled speedup against the targets
    (``None`` where not measured)."""
    checks = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        group = {r["config"]: r for r in rows if r["model"] == model and r["batch"] == batch}
        eager, compiled = group.get(TOMA_TOKENS, {}), group.get(f"{TOMA_TOKENS}@compiled", {})
        speedup, share, comp = eager.get("speedup"), eager.get("overhead_share"), compiled.get("speedup")
        checks.append(
            dict(
                model=model,
                batch=batch,
                toma_speedup=speedup,
                speedup_ok=None if speedup is None else speedup >= SPEEDUP_TARGET,
                overhead_share=share,
                overhead_ok=None if share is None else share <= OVERHEAD_TARGET,
                compiled_speedup=comp,
                compiled_ok=None if comp is None or speedup is None else comp >= speedup,
            )
        )
    return checks


def configure_dynamo() -> None:
    """Make dynamo's recompile limit an error: past it, dynamo silently runs the frame eagerly, which would time an
    eager model under a compiled label."""
    import torch._dynamo.config

    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True


def run_models(
    names: list[str],
    device: torch.device,
    tiny: bool,
    rounds: int,
    batches: dict[str, tuple[int, ...]] | None = None,
    compiled: bool = False,
    report: Callable[[list[dict[str, Any]], list[str]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Part (b): every configuration on each model of ``names`` (``sdxl``, ``flux``) and batch; result rows and
    notes. ``report(rows, notes)`` is called after each model and batch (the caller rewrites its JSON: an interrupted
    run keeps what it finished)."""
    configure_dynamo()
    dtype = torch.float32 if tiny else torch.bfloat16
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    skip = flash_skip_reason(device)
    if skip is not None:
        notes.append(f"flash configurations skipped: {skip}")
    for name in names:
        spec = MODELS[name][tiny]
        built = time.perf_counter()
        model = build_model(spec.arch, device, dtype)
        print(f"{spec.arch}: built on {device} in {time.perf_counter() - built:.1f} s", flush=True)
        configs = configurations(skip is None, compiled)
        for batch in (batches or BATCHES)[name]:
            print(f"{spec.arch}, batch {batch}, {spec.size}x{spec.size} latent:", flush=True)
            inputs = denoiser_inputs(model, batch, spec.size, spec.size, text=spec.text)
            group = bench_group(model, inputs, configs, device, rounds)
            print_table(group, COLUMNS)
            for row in group:
                for key in ("error", "overhead_error"):
                    if key in row:
                        print(f"  {row['config']}: {key.replace('_', ' ')}: {row[key]}")
            rows += [dict(model=name, arch=spec.arch, batch=batch, size=spec.size, text=spec.text) | r for r in group]
            if report is not None:
                report(rows, notes)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, notes
