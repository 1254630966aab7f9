"""The `mmsmall` command: a thin typer app that wires the parts together.

Each command imports its part lazily, so `mmsmall --help` is instant and mmsmall itself never
imports data_tools or eval at module level.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="mmsmall: synthesize and curate data, train a Molmo-style VLM with DeepSpeed, evaluate, export.",
)


@app.callback()
def _options(
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="also show third-party INFO logs (open_clip, DeepSpeed)")
    ] = False,
) -> None:
    from mmsmall.logs import set_verbose

    set_verbose(verbose)


def _parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"{what}: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


@app.command()
def synth(
    kind: Annotated[str, typer.Argument(help="charts | docs | invoices | tables | clocks | scenes")],
    n: Annotated[int, typer.Option(help="number of samples")] = 100,
    seed: Annotated[int, typer.Option(help="seed; the same seed gives byte-identical shards")] = 0,
    out: Annotated[Path, typer.Option(help="output shard folder")] = Path("data/synth"),
    split: Annotated[str, typer.Option(help="train | eval (disjoint seed streams)")] = "train",
    shard_size: Annotated[int, typer.Option(help="samples per tar shard")] = 500,
    opt: Annotated[list[str] | None, typer.Option(help="generator option key=value (YAML value)")] = None,
) -> None:
    """Render synthetic charts, documents, multi-page invoices, tables, clocks or counting/pointing scenes into shards."""
    import yaml

    from data_tools.synth import generate

    options = {k: yaml.safe_load(v) for k, v in _parse_kv(opt, "--opt").items()}
    manifest = generate(kind, n=n, seed=seed, out=out, split=split, shard_size=shard_size, **options)
    typer.echo(f"wrote {manifest['total']} {kind} samples to {out}")


@app.command()
def curate(
    config: Annotated[Path, typer.Argument(help="curation YAML, e.g. configs/curate/example.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted key=value overrides")] = None,
    executor: Annotated[str, typer.Option(help="local | ray")] = "local",
    workers: Annotated[int | None, typer.Option(help="worker processes (default: all cores)")] = None,
) -> None:
    """Validate, filter, deduplicate, decontaminate and shard raw data; write the HTML report."""
    from data_tools.curate import run_curation

    summary = run_curation(config, overrides=tuple(overrides or ()), executor=executor, workers=workers)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def download(ctx: typer.Context) -> None:
    """Fetch the image URLs of a parquet/jsonl/csv file into webdataset shards: ROWS --out DIR [--url-field]
    [--output webdataset|files] [--executor local|ray] [--retry-failed]."""
    from data_tools.__main__ import main as data_main

    raise typer.Exit(data_main(["download", *ctx.args]))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    config: Annotated[Path, typer.Argument(help="training YAML, e.g. configs/train/tiny-pretrain.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted key=value overrides")] = None,
    nproc: Annotated[int | None, typer.Option(help="processes per node (default: GPUs, or 1 on CPU)")] = None,
) -> None:
    """Train with DeepSpeed through launch/train.sh (the same path GPUs and nodes use)."""
    from mmsmall.config import load_config
    from mmsmall.train.inputs import require_training_inputs

    # a typo, a bad value, missing data or an unknown model fails here, before any process starts
    require_training_inputs(load_config(config, list(overrides or ())))
    from mmsmall.resources import LAUNCHER, find_config, launcher_env

    env = launcher_env()
    if nproc is not None:
        env["NPROC"] = str(nproc)
    cmd = ["bash", str(LAUNCHER), str(find_config(config)), *(overrides or [])]
    raise typer.Exit(subprocess.call(cmd, env=env))


# --device / --dtype / --max-crops: shared by eval, chat and predict.
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: the GPU if any, else cpu)")]


def _check_dtype(value: str) -> str:
    if value not in ("fp32", "bf16", "fp16"):
        raise typer.BadParameter(f"{value!r}; valid: fp32, bf16, fp16")
    return value


DType = Annotated[str, typer.Option(help="fp32 | bf16 | fp16", callback=_check_dtype)]
MaxCrops = Annotated[int | None, typer.Option(help="high-resolution crops per image (default: the model's)")]


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


PLAN_FAILED = 2  # mmsmall plan: 0 fits, 1 does not fit, 2 could not plan


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan(
    config: Annotated[Path, typer.Argument(help="training YAML, e.g. configs/train/caption-pretrain.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted key=value overrides")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs per node")] = 8,
    gpu_mem: Annotated[float, typer.Option("--gpu-mem", help="memory of one GPU in GiB")] = 80.0,
    nodes: Annotated[int, typer.Option(help="nodes")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """Per-GPU memory of a training run and the largest micro-batch that fits.

    Exit 0: fits; 1: does not fit (the last line says what to change); 2: could not plan (one line
    on stderr: a bad number, config or DeepSpeed json, or a model whose architecture is unknown offline).
    """
    from mmsmall.config import load_config
    from mmsmall.train.plan import as_dict, report
    from mmsmall.train.plan import plan as make_plan

    try:
        result = make_plan(load_config(config, list(overrides or ())), gpus, gpu_mem, nodes)
    except Exception as e:  # one line and exit 2, never a traceback's exit 1 ("does not fit")
        what = " ".join(str(e).split())
        if not isinstance(e, (ValueError, OSError)):  # not bad input: a failure of the planner itself
            what = f"{type(e).__name__}: {what}"
        typer.echo(f"mmsmall plan: could not plan: {what}", err=True)
        raise typer.Exit(PLAN_FAILED) from None
    typer.echo(json.dumps(as_dict(result), indent=2) if as_json else report(result))
    raise typer.Exit(0 if result.fits else 1)


@app.command(
    "eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def eval_(ctx: typer.Context) -> None:
    """Run the chart/document/counting/pointing suite with standard metrics (options: mmsmall eval --help)."""
    from eval.__main__ import main as eval_main

    raise typer.Exit(eval_main(ctx.args, prog="mmsmall eval"))


@app.command()
def export(
    src: Annotated[str, typer.Argument(help="training run folder, checkpoint folder or saved model")],
    out: Annotated[Path, typer.Argument(help="release folder to write")],
    format: Annotated[
        str, typer.Option("--format", help="mmsmall | molmo2 (stock transformers)")
    ] = "mmsmall",
    adapter_only: Annotated[
        bool, typer.Option(help="LoRA runs: write the peft adapter folders instead of merged weights")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="write into a non-empty folder (its other files stay)")
    ] = False,
) -> None:
    """Write a Hugging Face release folder (safetensors, config, processor, model card)."""
    from mmsmall.export import run_export

    path = run_export(src, out, fmt=format, adapter_only=adapter_only, overwrite=overwrite)
    typer.echo(f"exported to {path}")


@app.command()
def chat(
    question: Annotated[str, typer.Argument(help="the question to ask about the image")],
    model: Annotated[str, typer.Option(help="model folder")],
    image: Annotated[
        list[Path] | None, typer.Option(help="image file; repeat for several images, asked about in order")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    device: Device = None,
    dtype: DType = "fp32",
    max_crops: MaxCrops = None,
) -> None:
    """Ask one question about an image, several images (``--image`` repeated) or none."""
    from mmsmall.inference.chat import chat as run_chat

    answer = run_chat(
        model,
        [str(p) for p in image] if image else None,
        question,
        max_new_tokens=max_new_tokens,
        device=_device(device),
        max_crops=max_crops,
        dtype=dtype,
    )
    typer.echo(answer)


@app.command()
def predict(
    inputs: Annotated[str, typer.Argument(help="a folder of images or a shard folder")],
    model: Annotated[str, typer.Option(help="model folder")],
    out: Annotated[Path, typer.Option(help="where predictions and drawn points go")] = Path("predictions"),
    question: Annotated[str | None, typer.Option(help="question for every image (shards: their own)")] = None,
    device: Device = None,
    dtype: DType = "fp32",
    max_crops: MaxCrops = None,
) -> None:
    """Answer questions over a folder or shard set; points are drawn onto PNGs."""
    from mmsmall.inference.chat import predict as run_predict

    run_predict(
        model, inputs, str(out), question=question, device=_device(device), max_crops=max_crops, dtype=dtype
    )


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="model folder (any folder mmsmall eval --model takes)")],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0: a free one, printed at start)")] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option(help="the model id clients send (default: the folder's name)")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="require 'Authorization: Bearer KEY' (default: $MMSMALL_API_KEY; none: open)"),
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="most requests generating together")] = 32,
    max_queue: Annotated[int, typer.Option(min=1, help="most requests waiting; past it: HTTP 503")] = 256,
    max_request_bytes: Annotated[int, typer.Option(min=1, help="request body limit (HTTP 413)")] = 32 << 20,
    max_image_bytes: Annotated[int, typer.Option(min=1, help="encoded image limit (HTTP 413)")] = 20 << 20,
    max_image_pixels: Annotated[
        int, typer.Option(min=1, help="image width x height limit (HTTP 413)")
    ] = 40_000_000,
    max_images: Annotated[int, typer.Option(min=1, help="images one request may carry")] = 8,
    max_tokens_limit: Annotated[
        int, typer.Option(min=1, help="the most max_tokens a request may ask")
    ] = 1024,
    allow_text_only: Annotated[bool, typer.Option(help="answer requests that carry no image")] = False,
    shutdown_timeout: Annotated[
        float, typer.Option(help="seconds in-flight requests get to finish on SIGTERM / Ctrl-C")
    ] = 60.0,
    device: Device = None,
    dtype: DType = "fp32",
    max_crops: MaxCrops = None,
) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/models), requests batched as they arrive."""
    from mmsmall.inference.predictor import check_options
    from mmsmall.serve.server import ServeOptions
    from mmsmall.serve.server import serve as run_serve

    check_options(max_crops=max_crops)
    opts = ServeOptions(
        host=host, port=port, served_model_name=served_model_name, api_key=api_key, max_batch=max_batch,
        max_queue=max_queue, max_request_bytes=max_request_bytes, max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels, max_images=max_images, max_tokens_limit=max_tokens_limit, allow_text_only=allow_text_only,
        shutdown_timeout=shutdown_timeout,
    )  # fmt: skip
    run_serve(model, opts, device=_device(device), dtype=dtype, max_crops=max_crops)


@app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="a stock transformers Molmo2 folder or hub id")],
    out: Annotated[Path, typer.Argument(help="the mmsmall model folder to write")],
    overwrite: Annotated[
        bool, typer.Option(help="write into a non-empty folder (its other files stay)")
    ] = False,
) -> None:
    """Turn a released Molmo2 checkpoint into a model folder that train, eval and export take."""
    from mmsmall.export.importer import import_molmo2

    vlm = import_molmo2(source, out, overwrite=overwrite)
    typer.echo(f"imported {source} to {out} (prompt format: {vlm.cfg.prompt})")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where every artifact of the demo goes")] = Path("demo_out"),
    quick: Annotated[bool, typer.Option(help="a shortened demo (used by the test suite)")] = False,
) -> None:
    """Synthesize -> curate -> train (DeepSpeed, CPU) -> evaluate vs blind -> export, then print a table."""
    from mmsmall.demo import run_demo

    run_demo(out, quick=quick)


# Errors about the user's input (config, data, model folder, output folder): raised with a message
# that says what, where and what to do, so they are printed without a traceback. Anything else,
# a builtin FileNotFoundError included, is a bug and keeps its traceback. Looked up in the modules
# already imported, since each command imports its part lazily.
_USER_ERRORS = (
    ("mmsmall.errors", "MissingInput"),
    ("mmsmall.errors", "OutputExists"),
    ("mmsmall.errors", "InputTooLong"),
    ("mmsmall.errors", "AdapterBaseMismatch"),
    ("mmsmall.config", "ConfigError"),
    ("mmsmall.processing.crops", "ImageLoadError"),
    ("mmsmall.export.molmo2", "Molmo2Incompatible"),
    ("mmsmall.export.safetensors_io", "ShardIntegrityError"),
    ("data_tools.synth.core", "SynthError"),
    ("eval.tasks.base", "EvalDataError"),
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[m], name) for m, name in _USER_ERRORS if m in sys.modules)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        if not isinstance(e, _user_error_types()):
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
