"""The GPU check (issue #25), one entry; ``benchmarks/gpu_check.sh`` installs the wheels a bare machine lacks and runs
it (docs/benchmarks.md, "The GPU check").

Parts (``--parts``, default all four, run in this order: pipelines, kernels, models, compile -- the timings before
the compile checks, should time run out):

- ``pipelines`` (a): every method's default (``tm.ToMA()``, ``tm.ToMeSD()``, ``tm.CAToMe()``, ``tm.ToDo()``) and ToMA
  tokens mode at ratio 0.5 on every tiny pipeline (tiny-sd15, tiny-sdxl, tiny-flux, tiny-sd3, tiny-pixart) through
  the stock ``pipe(...)`` call, bf16 on CUDA (fp32 on the CPU), ``--steps`` steps at ``--size`` px: it runs, stays
  finite and merges (``tm.summary``); ``tm.remove`` gives the unpatched output bit for bit; ToMA's plans say which
  path built them (``TOKENMERGE_TRITON=check``: the Triton kernels where they agree with torch) and the output is
  compared with the torch path's (``TOKENMERGE_TRITON=0``).
- ``compile`` (a): ``torch.compile`` of the tiny UNet (ToMA's default: keys/values) and the tiny Flux transformer
  (tokens) in their pipelines: default mode and ``mode="reduce-overhead"`` (CUDA graphs, CUDA only; on the CPU dynamo
  with the ``eager`` backend): compile time, graphs, graph breaks, CUDA-graph skips, output against eager.
- ``kernels``: the fused ToMA kernels against torch at SDXL's sizes in fp32, fp16 and bf16 (destinations, largest
  error, latency; ``benchmarks/toma_kernels.py``). CUDA only.
- ``models`` (b): the real-size SDXL UNet and Flux-dev at 1024px, unaccelerated against every default and ToMA tokens
  0.5, CUDA events, bf16, torch SDPA and its FlashAttention kernel (``benchmarks/gpu_models.py``); ``--tiny``: the
  tiny denoisers instead (any device).

Out of scope: context-parallel runs (one GPU). Every check (and part) that fails is recorded with its error and the
run goes on; the JSON files are rewritten as parts finish, so an interrupted run keeps what it did. Writes into
``--out``: ``gpu_pipelines.json`` (parts pipelines and compile), ``gpu_kernels.json``, ``gpu_models.json``, each with
``meta.device`` (the GPU's name).

    bash benchmarks/gpu_check.sh --out docs/results                    # one GPU: meant for under 8 minutes
    PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --tiny --device cpu --out /tmp/gpu   # CPU smoke (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _common import write_results
from gpu_models import MODELS, SPEEDUP_TARGET, check_targets, compiled_graphs, describe, graph_breaks, run_models

import tokenmerge as tm
from tokenmerge.archs import tiny_pipeline
from tokenmerge.harness.models import resolve_device
from tokenmerge.harness.registry import HarnessError
from tokenmerge.ops import toma_dispatch

PIPELINES = ("tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3", "tiny-pixart")
PARTS = ("pipelines", "kernels", "models", "compile")
#: (pipeline, method) pairs compiled in part (a): ToMA's default on a UNet (keys/values) and on Flux (tokens).
COMPILED = (("tiny-sd15", "toma"), ("tiny-flux", "toma"))
#: Largest relative L2 distance between the Triton and the torch path's outputs that counts as agreement: two steps
#: of a tiny model; the kernels' matrices round differently (one 16-bit rounding of an entry in bf16).
TRITON_AGREE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
PROMPT = "a red cube"  # within the tiny T5 tokenizer's 16 tokens


def methods() -> dict[str, tm.Method]:
    """label -> method: every method's default and ToMA tokens mode at ratio 0.5."""
    return {
        "toma": tm.ToMA(),
        "toma-tokens-0.5": tm.ToMA(ratio=0.5, mode="tokens"),
        "tomesd": tm.ToMeSD(),
        "catome": tm.CAToMe(),
        "todo": tm.ToDo(),
    }


@contextlib.contextmanager
def triton_mode(value: str) -> Iterator[None]:
    """``TOKENMERGE_TRITON=value`` inside the block (read at every merge built)."""
    old = os.environ.get(toma_dispatch.ENV)
    os.environ[toma_dispatch.ENV] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[toma_dispatch.ENV]
        else:
            os.environ[toma_dispatch.ENV] = old


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def load(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    pipe = tiny_pipeline(name).to(device)
    pipe = pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, steps: int, size: int) -> torch.Tensor:
    """The stock call at a fixed seed; latents (exact comparisons need no VAE rounding)."""
    extra = {} if hasattr(pipe, "unet") else {"max_sequence_length": 16}
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.inference_mode():
        out = pipe(
            PROMPT,
            num_inference_steps=steps,
            height=size,
            width=size,
            output_type="latent",
            generator=generator,
            **extra,
        )
    return out.images.float().cpu()


def check_method(pipe: Any, label: str, method: tm.Method, base: torch.Tensor, steps: int, size: int) -> dict[str, Any]:
    """Apply, run (Triton checked), run the torch path where the plans say which path built them, remove, run."""
    row: dict[str, Any] = dict(config=label)
    agree = TRITON_AGREE[torch.float32 if pipe.dtype == torch.float32 else torch.bfloat16]
    try:
        tm.apply(pipe, method)
        with triton_mode("check"):
            out = generate(pipe, steps, size)
        summary = tm.summary(pipe)
        row.update(method=summary.method, calls=summary.calls, merged_calls=summary.merged_calls)
        row.update(finite=bool(torch.isfinite(out).all()), rel_l2=round(rel(out, base), 6), kernels=summary.kernels())
        if summary.kernels():
            with triton_mode("0"):
                row["rel_l2_vs_torch_path"] = round(rel(out, generate(pipe, steps, size)), 6)
    except Exception as exc:  # recorded, the check goes on
        row["error"] = describe(exc)
    finally:
        tm.remove(pipe)
    again = generate(pipe, steps, size)
    row["remove_exact"] = torch.equal(again, base)
    if not row["remove_exact"]:
        row["remove_max_abs"] = float((again - base).abs().max())
    row["ok"] = (
        "error" not in row
        and row["finite"]
        and row["merged_calls"] == row["calls"] > 0
        and row["remove_exact"]
        and row.get("rel_l2_vs_torch_path", 0.0) <= agree
    )
    return row


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"].get("cudagraph_skips", 0)


def check_compiled(
    name: str, label: str, mode: str, backend: str, device: torch.device, dtype: torch.dtype, steps: int, size: int
) -> dict[str, Any]:
    """``torch.compile`` of the pipeline's patched denoiser in ``mode``: two generations (the first compiles), the
    second's output against eager."""
    row: dict[str, Any] = dict(model=name, config=label, mode=mode, backend=backend)
    pipe = load(name, device, dtype)
    attr = "unet" if hasattr(pipe, "unet") else "transformer"
    denoiser = getattr(pipe, attr)
    try:
        tm.apply(pipe, methods()[label])
        eager = generate(pipe, steps, size)
        torch._dynamo.reset()
        graphs, breaks, skips = compiled_graphs(), graph_breaks(), cudagraph_skips()
        setattr(pipe, attr, torch.compile(denoiser, mode=None if mode == "default" else mode, backend=backend))
        start = time.perf_counter()
        first = generate(pipe, steps, size)
        row["first_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        second = generate(pipe, steps, size)
        row["second_s"] = round(time.perf_counter() - start, 3)
        row.update(graphs=compiled_graphs() - graphs, graph_breaks=graph_breaks() - breaks)
        blocks = tm.summary(pipe).blocks  # tokens in and out are kept under compile too
        merged = any(b.tokens_out is not None and b.tokens_out < b.tokens_in for b in blocks)
        row.update(cudagraph_skips=cudagraph_skips() - skips, merged=merged)
        row.update(rel_l2_first=round(rel(first, eager), 6), rel_l2_vs_eager=round(rel(second, eager), 6))
        row["ok"] = (
            merged
            and row["rel_l2_vs_eager"] <= TRITON_AGREE[torch.float32 if dtype == torch.float32 else torch.bfloat16]
        )
    except Exception as exc:
        row.update(error=describe(exc), ok=False)
    finally:
        setattr(pipe, attr, denoiser)
        tm.remove(pipe)
        torch._dynamo.reset()
    return row


def run_pipelines(device: torch.device, steps: int, size: int) -> list[dict[str, Any]]:
    """Part (a), every method x tiny pipeline: one row per pair (a pipeline that cannot be built: one error row)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name in PIPELINES:
        try:
            pipe = load(name, device, dtype)
            base = generate(pipe, steps, size)
            repeatable = torch.equal(generate(pipe, steps, size), base)
        except Exception as exc:
            rows.append(dict(model=name, config="baseline", error=describe(exc), ok=False))
            continue
        for label, method in methods().items():
            row = dict(model=name, baseline_repeatable=repeatable) | check_method(
                pipe, label, method, base, steps, size
            )
            print(f"  {name} {label}: {'ok' if row['ok'] else 'FAILED'} {row.get('error', '')}", flush=True)
            rows.append(row)
        del pipe
        gc.collect()
    return rows


def run_compiled(device: torch.device, steps: int, size: int) -> list[dict[str, Any]]:
    """Part (a), compiled: :data:`COMPILED` in default mode and (CUDA) ``reduce-overhead``; on the CPU with dynamo's
    ``eager`` backend (the smoke test checks the plumbing, not inductor)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes, backend = (("default", "reduce-overhead"), "inductor") if device.type == "cuda" else (("default",), "eager")
    rows = []
    for name, label in COMPILED:
        for mode in modes:
            rows.append(check_compiled(name, label, mode, backend, device, dtype, steps, size))
            row = rows[-1]
            print(
                f"  compiled {name} {label} {mode}: {'ok' if row['ok'] else 'FAILED'} {row.get('error', '')}",
                flush=True,
            )
    return rows


def run_kernels(repeats: int) -> list[dict[str, Any]]:
    """Part ``kernels`` (CUDA): Triton vs torch at SDXL's sizes in three dtypes."""
    import toma_kernels

    options = tm.ToMA().merge_options
    return [
        row
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
        for row in toma_kernels.kernel_rows(options, 2, 4, dtype, repeats, cuda=True)
    ]


def versions(device: torch.device) -> dict[str, Any]:
    """The device's name and the library versions, for every JSON."""

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    packages = {p: version(p) for p in ("diffusers", "transformers", "triton", "peft")}
    return dict(device=name, device_type=device.type, cuda=torch.version.cuda, **packages)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--tiny", action="store_true", help="part (b) on the tiny denoisers (any device)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="part (b) models")
    parser.add_argument("--rounds", type=int, default=5, help="part (b): timed rounds per configuration")
    parser.add_argument("--steps", type=int, default=2, help="part (a): denoising steps per generation")
    parser.add_argument("--size", type=int, help="part (a): image side in pixels (default 64 on CUDA, 32 on the CPU)")
    parser.add_argument("--compile-models", action="store_true", help="part (b) also under torch.compile (minutes)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="folder of the gpu_*.json files")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps) < 1:
        parser.error("--rounds and --steps must be >= 1")
    try:
        args.device = resolve_device(args.device)
    except HarnessError as exc:
        parser.error(str(exc))
    if "models" in args.parts and not args.tiny and args.device.type != "cuda":
        parser.error("the real-size models need a CUDA GPU; use --tiny for the CPU smoke test")
    args.size = args.size or (64 if args.device.type == "cuda" else 32)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, start = args.device, time.perf_counter()
    meta = dict(tiny=args.tiny, **versions(device), triton_mode=os.environ.get(toma_dispatch.ENV, "check"))
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    failed: list[str] = []
    pipelines: dict[str, Any] = dict(dtype=dtype, steps=args.steps, size=args.size, results=[], compiled=[])

    def write(name: str, rows: list[dict[str, Any]], **extra: Any) -> None:
        write_results(args.out / name, rows, extra, **meta, wall_s=round(time.perf_counter() - start, 1))

    def write_pipelines() -> None:
        verdicts = [dict(signature=str(k), trusted=v.trusted, error=v.error) for k, v in toma_dispatch.VERDICTS.items()]
        extra = {k: v for k, v in pipelines.items() if k != "results"}
        write("gpu_pipelines.json", pipelines["results"], **extra, triton_checks=verdicts)

    def part(name: str, run: Callable[[], None]) -> None:
        """Run one part; an error it raises is recorded (and printed) and the next part runs."""
        if name not in args.parts:
            return
        started = time.perf_counter()
        try:
            run()
        except Exception as exc:
            failed.append(f"part {name}: {describe(exc)}")
            print(f"part {name} FAILED: {describe(exc)}", flush=True)
        print(f"part {name}: {time.perf_counter() - started:.0f} s", flush=True)

    def pipelines_part() -> None:
        print(f"(a) every method x tiny pipelines on {device}:", flush=True)
        pipelines["results"] = run_pipelines(device, args.steps, args.size)
        write_pipelines()
        failed.extend(f"{r['model']} {r['config']}" for r in pipelines["results"] if not r["ok"])

    def kernels_part() -> None:
        if device.type != "cuda":
            print("kernels: skipped (CUDA only; tests/test_triton.py runs them under the interpreter)", flush=True)
            return
        print("kernels: Triton vs torch at SDXL sizes", flush=True)
        write("gpu_kernels.json", run_kernels(repeats=20))

    def models_part() -> None:
        print(f"(b) models ({'tiny' if args.tiny else 'real size, 1024px'}) on {device}:", flush=True)

        def report(rows: list[dict[str, Any]], notes: list[str], complete: bool = False) -> None:
            write("gpu_models.json", rows, targets=check_targets(rows), notes=notes, complete=complete)

        rows, notes = run_models(
            args.models, device, args.tiny, args.rounds, compiled=args.compile_models, report=report
        )
        report(rows, notes, complete=True)
        failed.extend(f"{r['model']} batch {r['batch']} {r['config']}: {r['error']}" for r in rows if "error" in r)
        for check in check_targets(rows):
            print(
                f"{check['model']} batch {check['batch']}: ToMA tokens 0.5 {check['toma_speedup']}x (target "
                f"{SPEEDUP_TARGET}x), overhead {check['overhead_share']}",
                flush=True,
            )

    def compile_part() -> None:
        print(f"(a) compiled tiny pipelines on {device}:", flush=True)
        pipelines["compiled"] = run_compiled(device, args.steps, args.size)
        write_pipelines()
        failed.extend(f"compiled {r['model']} {r['mode']}" for r in pipelines["compiled"] if not r["ok"])

    part("pipelines", pipelines_part)
    part("kernels", kernels_part)
    part("models", models_part)  # before compiling: the timings matter most if time runs out
    part("compile", compile_part)
    print(f"done in {time.perf_counter() - start:.0f} s; " + (f"FAILED: {'; '.join(failed)}" if failed else "all ok"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
