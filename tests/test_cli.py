"""The ``tokenmerge`` command line on tiny random models: bench and eval outputs, sharding, and bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_lpips import save_lpips_weights
from tests.test_metrics import save_metric_models
from tokenmerge.archs import build_unet, tiny_pipeline
from tokenmerge.cli import main

METHODS = ["--method", "toma:ratio=0.5", "--method", "tomesd:ratio=0.5", "--method", "todo:factor=2"]
EVAL = ["--prompts", "general", "--num-prompts", "1", "--seeds", "0", "1", "--steps", "2", "--height", "32"]
EVAL += ["--width", "32", "--device", "cpu", "--quiet"]


def test_bench_tiny_sd15_writes_json_csv_md(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "--arch", "tiny-sd15", *METHODS, "--rounds", "1", "--latent", "8", "--batch", "1"]
    argv += ["--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    configs = ["baseline", "toma:ratio=0.5", "tomesd:ratio=0.5", "todo:factor=2"]
    data = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in data["results"]] == configs
    assert data["meta"]["target"] == "tiny-sd15" and data["meta"]["kind"] == "denoiser"
    base, toma = data["results"][0], data["results"][1]
    assert base["speedup"] == 1.0 and base["flop_ratio"] == 1.0 and base["rel_l2_deviation"] == 0.0
    assert toma["flop_ratio"] > 1.0 and len(toma["times_ms"]) == 1 and toma["mem_kind"] == "cpu_rss_growth"
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == configs and float(rows[1]["flop_ratio"]) > 1.0
    md = (out / "results.md").read_text().splitlines()
    assert md[2].startswith("| config | median_ms |") and len(md) == 4 + len(configs)
    assert "wrote" in capsys.readouterr().out
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "arch, method",
    [
        ("tiny-flux", "toma:ratio=0.5,blocks={'double':(0,None),'single':(0,None)}"),  # default skips blocks 0-4
        ("tiny-sd3", "toma:ratio=0.5"),
        ("tiny-pixart", "toma:ratio=0.5"),
    ],
)
def test_bench_dit_architectures(tmp_path: Path, arch: str, method: str) -> None:
    argv = ["bench", "--arch", arch, "--method", method, "--rounds", "1", "--latent", "8", "--no-memory"]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    assert rows[1]["flop_ratio"] > 1.0 and rows[1]["rel_l2_deviation"] > 0


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux", "tiny-sd3", "tiny-pixart"])
def test_eval_every_tiny_pipeline_end_to_end(tmp_path: Path, model: str) -> None:
    """Every tiny pipeline ``tokenmerge list`` offers runs eval through the stock call, decoded images and a given
    size included (Flux and SD3 decode with the VAE's shift factor; PixArt's size check gets its call defaults)."""
    argv = ["eval", "--model", model, "--method", "todo:factor=2", *EVAL, "--seeds", "0", "--out", str(tmp_path / "e")]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "e" / "results.json").read_text())["results"]
    assert [r["config"] for r in rows] == ["baseline", "todo:factor=2"] and rows[1]["psnr"] < 100


def test_bench_saved_denoiser_and_pipeline_folders(tmp_path: Path) -> None:
    build_unet("tiny-sd15").save_pretrained(tmp_path / "unet")
    argv = ["bench", "--model", str(tmp_path / "unet"), "--method", "toma:ratio=0.5", "--rounds", "1", "--no-flops"]
    assert main([*argv, "--no-memory", "--latent", "8", "--device", "cpu", "--out", str(tmp_path / "b1")]) == 0
    assert json.loads((tmp_path / "b1" / "results.json").read_text())["meta"]["kind"] == "denoiser"
    tiny_pipeline("tiny-sd15").save_pretrained(tmp_path / "pipe")
    argv = ["bench", "--model", str(tmp_path / "pipe"), "--method", "toma:ratio=0.5", "--rounds", "1", "--steps", "2"]
    argv += ["--height", "32", "--width", "32", "--no-flops", "--no-memory", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "b2")]) == 0
    data = json.loads((tmp_path / "b2" / "results.json").read_text())
    assert data["meta"]["kind"] == "pipeline" and data["results"][1]["rel_l2_deviation"] > 0


def test_eval_pipeline_folder_with_metrics(tmp_path: Path) -> None:
    dino, clip = save_metric_models(tmp_path)
    tiny_pipeline("tiny-sd15").save_pretrained(tmp_path / "pipe")
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tmp_path / "pipe"), "--method", "toma:ratio=0.5", *EVAL]
    assert main([*argv, "--dino", dino, "--clip", clip, "--out", str(out)]) == 0
    for name in ("report.md", "results.json", "results.csv", "grid.png", "pareto.png"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["config"] for r in rows] == ["baseline", "toma:ratio=0.5"]
    base, toma = rows
    assert base["psnr"] == "inf" and base["dino_delta"] == pytest.approx(0, abs=1e-6) and base["fd_dino"] < 1e-6
    assert toma["psnr"] < 100 and toma["dino_delta"] > 0 and 0 <= toma["clip_t"] <= 100
    assert len(list((out / "images" / "baseline").glob("*.png"))) == 2
    assert "| toma:ratio=0.5 |" in (out / "report.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "dino", "eval", "pipe"]


def test_eval_lpips_tiny(tmp_path: Path) -> None:
    backbone, linear = save_lpips_weights(tmp_path / "lpips")
    out = tmp_path / "eval"
    argv = ["eval", "--model", "tiny-sd15", "--method", "toma:ratio=0.5", "--num-prompts", "1", "--seeds", "0"]
    argv += ["--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--quiet"]
    assert main([*argv, "--lpips-backbone", backbone, "--lpips-linear", linear, "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    base, toma = data["results"]
    assert base["lpips"] == 0.0 and toma["lpips"] > 0
    assert data["meta"]["lpips_backbone"] == backbone and data["meta"]["lpips_linear"] == linear
    with (out / "results.csv").open() as f:
        assert float(list(csv.DictReader(f))[1]["lpips"]) == pytest.approx(toma["lpips"])
    assert "| lpips |" in (out / "report.md").read_text()


def test_eval_failure_leaves_no_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmerge.harness import eval as ev

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("metric failed")

    monkeypatch.setattr(ev, "compute_results", fail)
    with pytest.raises(RuntimeError):
        main(["eval", "--model", "tiny-sd15", "--method", "toma:ratio=0.5", *EVAL, "--out", str(tmp_path / "e")])
    assert list(tmp_path.iterdir()) == []


def test_eval_two_processes(tmp_path: Path) -> None:
    """Items split between two CPU processes (``accelerate launch``), one report by the main process."""
    out = tmp_path / "eval2"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tokenmerge.cli"]
    cmd = [*launch, "eval", "--model", "tiny-sd15", "--method", "toma:ratio=0.5", *EVAL, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT="29533")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["processes"] == 2
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["rank000.json", "rank001.json"]
    assert sorted(p.name for p in (out / "images" / "toma_ratio=0.5").iterdir()) == ["0000_s0.png", "0000_s1.png"]
    assert [r["images"] for r in data["results"]] == [2, 2] and (out / "report.md").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--model", "/no/such/model", "--method", "toma"], "model path '/no/such/model' does not exist"),
        (["bench", "--arch", "sd99", "--method", "toma"], "unknown architecture 'sd99'"),
        (["bench", "--arch", "tiny-sd15", "--method", "fastmerge"], "unknown method 'fastmerge'"),
        (["bench", "--arch", "tiny-sd15", "--method", "toma:ratio=1.0"], r"ratio must be .*in \[0, 1\)"),
        (["bench", "--arch", "tiny-sd15", "--method", "tomesd:seed=abc"], r"seed takes int \| None, got 'abc'"),
        (["bench", "--arch", "tiny-sd15", "--method", "toma:blocks=abc"], r"blocks takes Mapping\[str, \w+\] \|"),
        (["bench", "--arch", "tiny-sd15", "--method", "toma", "--rounds", "0"], "--rounds must be >= 1"),
        (["bench", "--arch", "tiny-sd15"], "give at least one --method"),
        (
            ["bench", "--arch", "tiny-sd15", "--method", "toma", "--steps", "5"],
            "--steps does not apply to a bare denoiser",
        ),
        (["bench", "--arch", "tiny-sd15", "--method", "toma:ratio=0.5,ratio=0.6"], "option 'ratio' is given twice"),
        (["bench", "--method", "toma"], "one of the arguments --model --arch is required"),
        (["eval", "--model", "tiny-sd15", "--method", "toma", "--prompts", "PROMPTS"], "malformed prompt file"),
        (["eval", "--model", "tiny-sd15", "--method", "toma", "--dino", "/no/dino"], "cannot load DINOv2 model"),
        (["eval", "--model", "./missing", "--method", "toma"], "model path './missing' does not exist"),
        (["eval", "--model", "tiny-sd15", "--method", "toma", "--lpips-linear", "x.pth"], "needs --lpips-backbone"),
        (
            ["eval", "--model", "tiny-sd15", "--method", "toma", "--lpips-backbone", "/no/alex.pth"],
            r"LPIPS backbone \(torchvision AlexNet\) file '/no/alex.pth' does not exist",
        ),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_one_line_nonzero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# nothing but comments\n")
    argv = [str(prompts) if a == "PROMPTS" else a for a in argv]
    out = tmp_path / "out"
    code = main([*argv, "--out", str(out)] if argv[0] != "frobnicate" else argv)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("tokenmerge: error: "), err
    assert re.search(message, err), err
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_console_script_error_has_no_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tokenmerge.cli", "bench", "--arch", "nope", "--method", "toma", "--out", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown architecture 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The ``tokenmerge: error:`` line on stderr (library warnings aside, e.g. transformers' on torchvision)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tokenmerge: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--arch", "tiny-sd15", "--method", "toma", "--device", "cpu"],
        ["eval", "--model", "tiny-sd15", "--method", "toma", *EVAL],
        ["analyze", "--model", "tiny-sd15", "--steps", "2", "--device", "cpu", "--quiet"],
        ["demo", "--model", "unet", "--quiet"],
    ],
)
def test_unwritable_out_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    """--out below a file: one line naming the output, and no model is built or loaded."""

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr("tokenmerge.cli.build_architecture", no_work)
    monkeypatch.setattr("tokenmerge.archs.tiny_pipeline", no_work)
    monkeypatch.setattr("tokenmerge.reference.demo.load_pipeline", no_work)
    (tmp_path / "file").write_text("")
    assert main([*argv, "--out", str(tmp_path / "file" / "out")]) == 2
    assert re.search(r"cannot write output .*/file/out: .*/file is a file, not a folder", _one_line_error(capsys))


def test_tune_checks_out_and_cache_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """tune's --out (which it does not replace without --overwrite) and --cache: one line, before the model loads."""

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before --out / --cache were checked")

    monkeypatch.setattr("tokenmerge.harness.runners.open_runner", no_work)
    (tmp_path / "file").write_text("")
    (tmp_path / "old.json").write_text("{}")
    base = ["tune", "--model", "tiny-sd15", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "old.json")]) == 2
    assert "old.json already exists (pass --overwrite" in _one_line_error(capsys)
    assert main([*base, "--cache", str(tmp_path / "file" / "tuned")]) == 2
    assert re.search(
        r"--cache / cache=: cannot write output .*file/tuned/tune.json: .*file is a file", _one_line_error(capsys)
    )
    with pytest.raises(AssertionError, match="work started"):  # both fine: the work starts
        main([*base, "--out", str(tmp_path / "old.json"), "--overwrite", "--cache", str(tmp_path / "c")])


def test_quiet_hides_loading_bars(tmp_path: Path, saved_pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--model", str(saved_pipeline), "--method", "todo", "--rounds", "1", "--steps", "1"]
    argv += ["--height", "16", "--width", "16", "--no-flops", "--no-memory", "--device", "cpu"]
    for quiet in (False, True):
        assert main([*argv, "--out", str(tmp_path / f"b{quiet}"), *(["--quiet"] * quiet)]) == 0
        assert ("Loading pipeline components" in capsys.readouterr().err) is not quiet
    from diffusers.utils import logging as diffusers_logging

    assert diffusers_logging.is_progress_bar_enabled()  # as it was


def test_output_probe_reports_an_unwritable_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that takes no new entries (as root, read-only modes do not stop writes: the probe is refused)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryDirectory", refuse)
    argv = ["bench", "--arch", "tiny-sd15", "--method", "toma", "--out", str(tmp_path / "a" / "b")]
    assert main(argv) == 2
    assert f"cannot write output {tmp_path}/a/b: Permission denied in {tmp_path}" in _one_line_error(capsys)


def test_write_error_after_the_work_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tokenmerge.harness.report.write_csv", full)
    argv = ["bench", "--arch", "tiny-sd15", "--method", "toma", "--rounds", "1", "--latent", "8", "--batch", "1"]
    assert main([*argv, "--no-flops", "--no-memory", "--device", "cpu", "--out", str(tmp_path / "b")]) == 2
    assert "cannot write output" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_io_error_during_eval_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("PIL.Image.Image.save", full)
    argv = ["eval", "--model", "tiny-sd15", "--method", "toma", *EVAL, "--seeds", "0", "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    assert "No space left on device (--debug shows where)" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_gpu_out_of_memory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    def oom(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    monkeypatch.setattr("tokenmerge.harness.bench.run_bench", oom)
    assert main(["bench", "--arch", "tiny-sd15", "--method", "toma", "--out", str(tmp_path / "b")]) == 2
    line = _one_line_error(capsys)
    assert "CUDA out of memory. Tried to allocate 20.00 GiB (try a smaller batch, image size or --dtype" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "model, height, message",
    [
        ("tiny-sd15", "30", r"--height 30 --width 32: `height` and `width` have to be divisible by 8"),
        ("tiny-flux", "30", r"--height 30: FluxPipeline takes multiples of 4 \(VAE downscale x patch\), e.g. 28"),
    ],
)
def test_eval_size_the_pipeline_cannot_take(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    height: str,
    message: str,
) -> None:
    """Checked against the loaded pipeline before anything is generated (Flux would silently resize)."""
    from tokenmerge.harness import eval as ev

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("generation started")

    monkeypatch.setattr(ev, "_generate", no_generation)
    argv = ["eval", "--model", model, "--method", "toma", *EVAL, "--height", height, "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    assert re.search(message, _one_line_error(capsys))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipe") / "tiny-sd15"
    tiny_pipeline("tiny-sd15").save_pretrained(path)
    return path


def _corrupt_text_encoder(path: Path) -> None:
    next((path / "text_encoder").glob("*.safetensors")).write_bytes(b"not a safetensors file")


def _unknown_pipeline_class(path: Path) -> None:
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps(index | {"_class_name": "NoSuchPipeline"}))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_corrupt_text_encoder, "deserializing header"),
        (_unknown_pipeline_class, "no attribute NoSuchPipeline"),
    ],
)
def test_broken_model_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], saved_pipeline: Path, damage: object, message: str
) -> None:
    """Errors diffusers, transformers and safetensors raise while loading name the model, in one line."""
    import shutil

    path = tmp_path / "pipe"
    shutil.copytree(saved_pipeline, path)
    damage(path)  # type: ignore[operator]
    argv = ["bench", "--model", str(path), "--method", "toma", "--device", "cpu", "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert f"cannot load pipeline '{path}': " in line and message in line, line


def test_unknown_hub_id_names_the_cause_not_a_hidden_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model", "nope", "--method", "toma", "--out", "never-written"]) == 2
    line = _one_line_error(capsys)
    assert "cannot load pipeline 'nope' (no such folder; tried as a hub id): " in line
    assert not re.search("stack ?trace|traceback", line, re.IGNORECASE), line


def test_debug_raises_with_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmerge.errors import HarnessError

    argv = ["bench", "--arch", "sd99", "--method", "toma", "--out", "never-written"]
    with pytest.raises(HarnessError, match="unknown architecture 'sd99'"):
        main(["--debug", *argv])
    with pytest.raises(HarnessError, match="unknown architecture 'sd99'"):
        main([*argv, "--debug"])
    monkeypatch.setenv("TOKENMERGE_DEBUG", "1")
    with pytest.raises(HarnessError, match="unknown architecture 'sd99'"):
        main(argv)


def test_describe_drops_pointers_to_unseen_tracebacks() -> None:
    from tokenmerge.errors import describe

    try:
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as inner:
            raise OSError("Cannot load model x. Please check out the root cause in the stacktrace above.") from inner
    except OSError as exc:
        assert describe(exc) == "Cannot load model x. (cause: [Errno -2] Name or service not known)"
    assert describe(ValueError("first line\nsecond line")) == "first line"
    assert describe(KeyError()) == "KeyError"
