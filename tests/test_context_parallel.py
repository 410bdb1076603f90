"""Token merging under diffusers' context parallelism: two local ranks (gloo), a tiny Flux (2 + 2 blocks), Ulysses,
``ulysses_anything`` and Ring.

Process start-up dominates, so one spawned group of two ranks runs every check (:func:`rank_checks`) and returns plain
values; the tests assert on them. On a CPU, diffusers' context parallelism needs two stand-ins
(:func:`tokenmerge.harness.parallel.cpu_stand_ins`): ``torch.accelerator.device_count()`` is 0 (``enable_parallelism``
takes the rank modulo it), and the native attention backend refuses the log-sum-exp that ring attention needs ("Native
attention does not support return_lse=True"), so the ring runs here on a plain-math op that returns it.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import tokenmerge as tm
from tokenmerge.harness.parallel import CollectiveBytes, run_ranks

ALL = {"double": (0, None), "single": (0, None)}
#: Methods that run on bands (name -> method), each checked against its single-device run.
BAND_METHODS = {
    "toma": tm.ToMA(0.5, mode="tokens", blocks=ALL),  # what ToMA(0.5) is on Flux.1-dev (the tiny model: kv)
    "toma-kv": tm.ToMA(0.5, mode="kv", blocks=ALL),
    "todo-2": tm.ToDo(2, blocks=ALL),
    "todo-3": tm.ToDo(3, blocks=ALL),  # rank 1's band starts at row 8: its kept rows 9, 12, 15 keep the global phase
}
REFUSED = {"tomesd": tm.ToMeSD(0.5, blocks=ALL), "catome": tm.CAToMe(0.7, batch="max", blocks=ALL)}
SETTINGS = {
    "ulysses": dict(ulysses_degree=2),
    "ulysses_anything": dict(ulysses_degree=2, ulysses_anything=True),
    "ring": dict(ring_degree=2),
}


def generate(model: torch.nn.Module, inputs: dict, steps: int = 2) -> torch.Tensor:
    """``steps`` denoiser calls at steps 0, 1, ... (plans reused across steps), their outputs stacked."""
    outs = []
    with torch.no_grad():
        for step in range(steps):
            tm.set_step(model, step)
            outs.append(model(**inputs, return_dict=False)[0])
    return torch.stack(outs)


def with_method(model: torch.nn.Module, method: tm.Method, inputs: dict) -> torch.Tensor:
    tm.apply(model, method)
    try:
        return generate(model, inputs)
    finally:
        tm.remove(model)


def error(fn: Any) -> str | None:
    """The message of the ``ValueError`` that ``fn()`` raises, or ``None``."""
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


def hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def rank_checks(rank: int, world: int) -> dict[str, Any]:
    """Everything one rank checks, as plain values (see the tests)."""
    from tokenmerge.archs import build_dit
    from tokenmerge.harness.models import denoiser_inputs

    single = build_dit("tiny-flux")
    grids = {size: denoiser_inputs(single, 2, *size, text=8) for size in ((16, 16), (12, 16), (15, 16), (5, 6))}
    expected = {name: with_method(single, m, grids[16, 16]) for name, m in BAND_METHODS.items()}
    expected["none"] = generate(single, grids[16, 16])
    expected["todo-4@12x16"] = with_method(single, tm.ToDo(4, blocks=ALL), grids[12, 16])
    out: dict[str, Any] = {"rel": {}, "errors": {}}
    models = check_settings(grids[16, 16], expected, out)
    check_bytes_summary_remove(models["ulysses"], grids[16, 16], out)
    check_bands(models, grids, expected, out)
    check_apply_order(grids[16, 16], expected, out)
    check_unsupported_model(out)
    return out


def parallel(options: dict[str, Any]) -> torch.nn.Module:
    """A tiny Flux with diffusers' context parallelism ``options`` enabled."""
    from diffusers import ContextParallelConfig

    from tokenmerge.archs import build_dit

    model = build_dit("tiny-flux")
    model.enable_parallelism(config=ContextParallelConfig(**options))
    return model


def check_settings(inputs: dict, expected: dict, out: dict) -> dict[str, torch.nn.Module]:
    """Every setting: each band method against its single-device run, the refused methods' errors at apply."""
    models = {}
    for setting, options in SETTINGS.items():
        model = models[setting] = parallel(options)
        out["rel"][setting, "none"] = rel(generate(model, inputs), expected["none"])
        for name, method in BAND_METHODS.items():
            out["rel"][setting, name] = rel(with_method(model, method, inputs), expected[name])
        for name, method in REFUSED.items():
            out["errors"][setting, name] = error(lambda model=model, method=method: tm.apply(model, method))
    return models


def check_bytes_summary_remove(model: torch.nn.Module, inputs: dict, out: dict) -> None:
    """Bytes at the collectives unmerged and with ToMA(0.5) on every block; the rank's summary; remove is exact."""
    unpatched_hooks, state = hooks(model), {k: v.clone() for k, v in model.state_dict().items()}
    with CollectiveBytes() as unmerged:
        plain = generate(model, inputs, steps=1)
    tm.apply(model, tm.ToMA(0.5, mode="tokens", blocks=ALL))
    out["summary before a call"] = tm.summary(model).parallel
    with CollectiveBytes() as merged:
        generate(model, inputs, steps=1)
    summary = tm.summary(model)
    out["bytes"] = {"unmerged": unmerged.attention, "merged": merged.attention}
    out["bytes_other"] = {"unmerged": unmerged.other, "merged": merged.other}
    out["summary"] = (str(summary), summary.parallel, [(b.tokens_in, b.tokens_out) for b in summary.blocks])
    tm.remove(model)
    after = generate(model, inputs, steps=1)
    out["removed"] = (
        torch.equal(after, plain),
        hooks(model) == unpatched_hooks,
        all(torch.equal(v, state[k]) for k, v in model.state_dict().items()),
    )


def check_bands(models: dict, grids: dict, expected: dict, out: dict) -> None:
    """Bands that cannot be run on (errors at the first call), or run with a documented difference (a warning)."""
    model, anything = models["ulysses"], models["ulysses_anything"]
    tm.apply(model, tm.ToDo(4, blocks=ALL))  # 12 rows: bands of 6 rows keep rows {0, 4} and {8}
    out["errors"]["ulysses", "todo-4@12x16"] = error(lambda: generate(model, grids[12, 16], steps=1))
    out["errors"]["ulysses", "rows@5x6"] = error(lambda: generate(model, grids[5, 6]))  # 15 tokens per rank
    tm.remove(model)
    todo = with_method(anything, tm.ToDo(4, blocks=ALL), grids[12, 16])
    out["rel"]["ulysses_anything", "todo-4@12x16"] = rel(todo, expected["todo-4@12x16"])
    tm.apply(anything, tm.ToMA(0.5, mode="tokens", blocks=ALL))
    out["errors"]["ulysses_anything", "rows@15x16"] = error(lambda: generate(anything, grids[15, 16]))
    with warnings.catch_warnings(record=True) as caught:  # 6-row bands of 4-row tiles: each rank tiles its rows
        warnings.simplefilter("always")
        generate(anything, grids[12, 16], steps=1)
    out["misaligned"] = (
        [str(w.message) for w in caught if "tokenmerge" in str(w.message)],
        [(b.tokens_in, b.tokens_out) for b in tm.summary(anything).blocks],
    )
    tm.remove(anything)


def check_apply_order(inputs: dict, expected: dict, out: dict) -> None:
    """Applied before enable_parallelism: the same result; a refused method raises at the first call."""
    from diffusers import ContextParallelConfig

    from tokenmerge.archs import build_dit

    for name, method in (("toma", BAND_METHODS["toma"]), ("tomesd", REFUSED["tomesd"])):
        model = build_dit("tiny-flux")
        tm.apply(model, method)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        if name == "toma":
            out["rel"]["ulysses", "toma applied first"] = rel(generate(model, inputs), expected["toma"])
        else:
            out["errors"]["ulysses", "tomesd applied first"] = error(lambda model=model: generate(model, inputs))


def check_unsupported_model(out: dict) -> None:
    """A model whose adapter finds no bands, split by a plan of the user's own (diffusers ships none for SD3)."""
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ContextParallelOutput

    from tokenmerge.archs import build_dit

    sd3 = build_dit("tiny-sd3")
    plan = {"proj_out": ContextParallelOutput(gather_dim=1)}
    sd3.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2), cp_plan=plan)
    out["errors"]["ulysses", "toma on sd3"] = error(lambda: tm.apply(sd3, tm.ToMA(0.5)))


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(rank_checks, 2)


@pytest.mark.parametrize("setting", SETTINGS)
def test_band_methods_equal_the_single_device_run(ranks: list[dict], setting: str) -> None:
    """ToMA (tokens and keys/values) and ToDo on each rank's band of whole tile rows: the parallel output equals the
    single-device output of the same method (two steps, plans reused); so does the unmerged model."""
    for out in ranks:
        for name in ("none", *BAND_METHODS):
            assert out["rel"][setting, name] <= 1e-5, (setting, name, out["rel"][setting, name])
    assert ranks[0]["rel"]["ulysses", "toma applied first"] <= 1e-5  # tm.apply before enable_parallelism


@pytest.mark.parametrize("setting", SETTINGS)
def test_methods_matching_across_the_image_are_refused(ranks: list[dict], setting: str) -> None:
    options = ", ".join(f"{k}={v}" for k, v in SETTINGS[setting].items())
    for name, method in REFUSED.items():
        message = ranks[0]["errors"][setting, name]
        assert message is not None and method.describe() in message and options in message, message
    first = ranks[0]["errors"]["ulysses", "tomesd applied first"]  # at the first call after enable_parallelism
    assert first is not None and "ToMeSD" in first and "ulysses_degree=2" in first
    sd3 = ranks[0]["errors"]["ulysses", "toma on sd3"]
    assert sd3 is not None and "ToMA" in sd3 and "ulysses_degree=2" in sd3 and "SD3Transformer2DModel" in sd3


def test_collective_bytes_cut_by_merging(ranks: list[dict]) -> None:
    """Counted at the collectives: ToMA(0.5) on every block cuts what the attention's all-to-alls send by > 40%
    (image tokens halved, the 4 text tokens per rank kept); the output gather is unchanged."""
    for out in ranks:
        b = out["bytes"]
        assert b["unmerged"] > 0 and 1 - b["merged"] / b["unmerged"] >= 0.4, b
        assert out["bytes_other"]["merged"] == out["bytes_other"]["unmerged"] > 0


def test_summary_names_the_rank_and_its_tokens(ranks: list[dict]) -> None:
    for rank, out in enumerate(ranks):
        text, parallel, tokens = out["summary"]
        rows = "0-7" if rank == 0 else "8-15"
        assert parallel == f"rank {rank} of 2 (ulysses_degree=2): image rows {rows} of the 16x16 grid"
        assert f"context parallel: {parallel}" in text
        assert tokens == [(128, 64)] * 4  # this rank's 8 x 16 band, half of it merged away
        assert out["summary before a call"] == f"rank {rank} of 2 (ulysses_degree=2)"


def test_remove_restores_the_parallel_model_exactly(ranks: list[dict]) -> None:
    for out in ranks:
        assert out["removed"] == (True, True, True)


def test_bands_that_cannot_run_raise_naming_method_and_setting(ranks: list[dict]) -> None:
    out = ranks[0]
    todo = out["errors"]["ulysses", "todo-4@12x16"]  # unequal key lengths across ranks, equal ones needed
    assert todo is not None and "ToDo(factor=4" in todo and "ulysses_degree=2" in todo and "1 or 2 rows" in todo
    assert out["rel"]["ulysses_anything", "todo-4@12x16"] <= 1e-5  # there unequal lengths are fine, and exact
    rows = out["errors"]["ulysses", "rows@5x6"]  # 15 tokens per rank: two and a half rows
    assert rows is not None and "ToDo(factor=4" in rows and "not whole rows" in rows and "5x6" in rows
    odd = out["errors"]["ulysses_anything", "rows@15x16"]
    assert odd is not None and "ToMA" in odd and "ulysses_anything=True" in odd and "not whole rows" in odd


def test_bands_of_partial_tiles_are_tiled_per_rank_with_a_warning(ranks: list[dict]) -> None:
    """12 rows over 2 ranks: 6-row bands of 4-row tiles. Each rank tiles its own rows (a 4-row and a 2-row strip of
    tiles: 48 of 96 tokens kept) and says once that this differs from a single-device run."""
    for out in ranks:
        messages, tokens = out["misaligned"]
        assert len(messages) == 1 and "not whole 4-row tiles" in messages[0] and "ulysses_anything=True" in messages[0]
        assert tokens == [(96, 48)] * 4
