"""What a training run needs that a config alone does not show: readable data and known models.

Checked by ``mmsmall train`` and the training entry point before any process or engine starts.
"""

from __future__ import annotations

from pathlib import Path

from mmsmall.config import ConfigError, ModelConfig, RunConfig


def require_training_inputs(cfg: RunConfig) -> None:
    """What a training run needs that a config alone does not show: readable data and known models.

    Called by ``mmsmall train`` and the training entry point before any process or engine starts.
    """
    if not cfg.data.train:
        raise ConfigError("data.train: empty; give shard folders, e.g. data.train='[{path: curated/}]'")
    from mmsmall.data.shards import resolve_shards

    for i, entry in enumerate(cfg.data.train):
        if not entry.path:
            raise ConfigError(f"data.train[{i}].path: empty; give a shard folder or a .tar pattern")
        try:
            if not resolve_shards(entry.path):
                raise FileNotFoundError(entry.path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.train[{i}].path: no shards at {entry.path!r} ({e})") from None
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise ConfigError(f"out_dir: {cfg.out_dir!r} is a file; give a folder for the run (new or its own)")
    if cfg.train.init_from:  # a later stage trains that folder's model: the config's names are not used
        _require_model_folder(Path(cfg.train.init_from))
        return
    _require_model_names(cfg.model)


def _require_model_folder(folder: Path) -> None:
    """``train.init_from`` is a saved model (``VLM.save_pretrained``) or a stock Molmo2 folder."""
    where = f"train.init_from: {str(folder)!r}"
    wanted = "give a saved model folder (a run's out_dir/model), an `mmsmall import` output or a stock Molmo2 folder"
    if not folder.is_dir():
        raise ConfigError(f"{where} is not a folder; {wanted}")
    if (folder / "model_config.yaml").is_file() and (folder / "model.safetensors").is_file():
        return
    if (folder / "model" / "model_config.yaml").is_file() or (folder / "checkpoints").is_dir():
        raise ConfigError(
            f"{where} is a training run folder; give its saved model: train.init_from={folder / 'model'}"
        )
    if (folder / "complete.json").is_file() or any(folder.glob("client_rank*.pt")):
        raise ConfigError(
            f"{where} is a DeepSpeed checkpoint; export it first (`mmsmall export {folder} OUT`, then "
            "train.init_from=OUT) or give the run's model folder"
        )
    from mmsmall.export.importer import is_molmo2_folder

    if not is_molmo2_folder(folder):
        raise ConfigError(
            f"{where} holds neither model_config.yaml + model.safetensors nor a Molmo2 release; {wanted}"
        )


def _require_model_names(m: ModelConfig) -> None:
    from mmsmall.model.vision import VISION_BACKENDS
    from mmsmall.model.vlm import MASK_IMPLEMENTATIONS

    if m.vision.backend not in VISION_BACKENDS:
        raise ConfigError(
            f"model.vision.backend: {m.vision.backend!r}; valid: {', '.join(sorted(VISION_BACKENDS))}"
        )
    if m.llm.attn_implementation not in MASK_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.llm.attn_implementation: {m.llm.attn_implementation!r}; valid: {', '.join(MASK_IMPLEMENTATIONS)}"
        )
    if m.vision.backend == "open_clip" and m.vision.custom is None:
        import open_clip

        if m.vision.name not in open_clip.list_models():
            raise ConfigError(
                f"model.vision.name: {m.vision.name!r} is not an open_clip model; see open_clip.list_models(), "
                "or set model.vision.custom"
            )
    if m.llm.custom is None and m.llm.name and not Path(m.llm.name).exists():
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(m.llm.name)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"model.llm.name: {m.llm.name!r} is neither a local folder nor a hub model this machine can "
                f"reach or has cached ({first})"
            ) from None
