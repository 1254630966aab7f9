"""``run_export``: a run, checkpoint or saved model -> a release folder; ``load_molmo2``: the reverse.

Formats:

* ``mmsmall``: our HF classes (:mod:`mmsmall.export.hf`): any tower / LLM combination.
* ``molmo2``: transformers' stock ``Molmo2ForConditionalGeneration`` + ``Molmo2Processor``, loadable
  with ``AutoModelForImageTextToText`` / ``AutoProcessor`` and no remote code; only for models that
  fit (:func:`mmsmall.export.molmo2.check_molmo2_fit` says why not otherwise).

Both write sharded safetensors (<= 5 GB a shard, with an index), ``checksums.json`` (sha256 of
every shard), config, generation config, tokenizer, processor, chat template and README.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmsmall.model.vlm import VLM

from mmsmall.errors import refuse_non_empty
from mmsmall.export.card import CHAT_TEMPLATE, model_card, read_eval_results
from mmsmall.export.safetensors_io import shard_files, umask_mode, write_checksums

log = logging.getLogger(__name__)

FORMATS = ("mmsmall", "molmo2")


def _generation_config(tokenizer, max_new_tokens: int = 256):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )


def save_molmo2(vlm: VLM, out_dir: str | Path, max_shard_size: str = "5GB") -> Path:
    """Write ``vlm`` as a stock transformers Molmo2 folder (raises Molmo2Incompatible when it does not fit)."""
    from mmsmall.export.molmo2 import build_molmo2_model, build_molmo2_processor

    out_dir = Path(out_dir)
    model = build_molmo2_model(vlm, vlm.tokenizer, vlm.cfg.image.crop_size)
    model.generation_config = _generation_config(vlm.tokenizer)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    umask_mode(*shard_files(out_dir))  # transformers writes them 0600
    processor = build_molmo2_processor(vlm.tokenizer, vlm.cfg.image, _chat_template(vlm))
    processor.save_pretrained(out_dir)
    write_checksums(out_dir)
    return out_dir


def _chat_template(vlm: VLM) -> str:
    """The template the model was trained in (stock Molmo2 format): an imported release's own, else ours."""
    return vlm.tokenizer.chat_template if vlm.cfg.prompt == "chat_template" else CHAT_TEMPLATE


def save_mmsmall(vlm: VLM, out_dir: str | Path, max_shard_size: str = "5GB") -> Path:
    """Write ``vlm`` with our own HF classes (model, processor, tokenizer, chat template)."""
    from mmsmall.export.hf import MMSmallForConditionalGeneration, processor_for

    out_dir = Path(out_dir)
    model = MMSmallForConditionalGeneration.from_vlm(vlm)
    model.generation_config = _generation_config(vlm.tokenizer)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    processor_for(vlm, chat_template=CHAT_TEMPLATE).save_pretrained(out_dir)
    write_checksums(out_dir)
    return out_dir


def _trained_from(ckpt_dir: Path) -> str | None:
    """``train.init_from`` of the run that wrote ``ckpt_dir`` (absolute when it exists here)."""
    import yaml

    cfg = ckpt_dir / "config.yaml"
    init_from = (
        (yaml.safe_load(cfg.read_text()) or {}).get("train", {}).get("init_from") if cfg.exists() else None
    )
    if init_from and Path(init_from).exists():
        return str(Path(init_from).resolve())
    return init_from


def run_export(
    src: str | Path,
    out: str | Path,
    fmt: str = "mmsmall",
    eval_results: str | Path | None = None,
    max_shard_size: str = "5GB",
    adapter_only: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export ``src`` (run folder -> its ``latest`` checkpoint, checkpoint folder, or saved model) to ``out``.

    A LoRA run's adapters are merged into the weights, so the release needs no adapter code;
    ``adapter_only`` writes the peft adapter folders instead (:func:`mmsmall.model.lora.save_adapter`).

    ``overwrite``: write into a non-empty ``out`` (refused otherwise); files there that are not
    part of the release stay, and ``checksums.json`` lists only the release's own shards.
    ``eval_results``: eval/runner.py's ``results.json`` (or its folder) for the model card; when
    None, ``{run}/eval/results.json`` is used if the run has one.
    """
    import yaml

    from mmsmall.config import ConfigError
    from mmsmall.export.load import load_vlm

    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r}; valid: {', '.join(FORMATS)}")
    out = Path(out)
    refuse_non_empty(out, "export", overwrite)
    if adapter_only:
        from mmsmall.model.lora import has_lora, save_adapter

        vlm, source = load_vlm(src, merge_lora=False)
        if not has_lora(vlm):
            raise ConfigError(
                f"--adapter-only: {src} holds no LoRA adapters (it was not trained with train.lora)"
            )
        path = save_adapter(vlm, out, base=_trained_from(source.path))
        log.info("exported the LoRA adapters of %s to %s", src, path)
        return path
    vlm, source = load_vlm(src)
    if fmt == "mmsmall" and vlm.cfg.prompt == "chat_template":
        raise ConfigError(
            f"{src} was trained in its own chat template (an imported release); our HF format's processor "
            "prompts in the mmsmall format, so export it with --format molmo2"
        )
    if fmt == "molmo2":
        from mmsmall.export.molmo2 import check_molmo2_fit

        check_molmo2_fit(vlm)  # fail before writing anything
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = None
    cfg_yaml = source.path / "config.yaml"
    if cfg_yaml.exists():
        run_cfg = yaml.safe_load(cfg_yaml.read_text())
    if (
        eval_results is None
        and source.run_dir is not None
        and (source.run_dir / "eval" / "results.json").exists()
    ):
        eval_results = source.run_dir / "eval" / "results.json"
    results = read_eval_results(eval_results)
    with torch.no_grad():
        (save_molmo2 if fmt == "molmo2" else save_mmsmall)(vlm, out, max_shard_size=max_shard_size)
    (out / "README.md").write_text(model_card(vlm, fmt, run_config=run_cfg, eval_results=results))
    log.info("exported %s (%s) to %s in %s format", src, source.kind, out, fmt)
    return out
