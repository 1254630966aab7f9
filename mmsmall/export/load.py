"""The one loader: ``load_model(src)`` builds a model from a config or loads any model folder.

``src`` is a ``ModelConfig`` (the model it describes: hub weights where it names them, or none
with ``weights=False``), a :class:`Source`, or a path to any of:

* a training run folder (``{run}/checkpoints/latest`` names the newest complete checkpoint),
* a checkpoint root (the ``checkpoints`` folder with its ``latest`` file),
* one checkpoint folder (``step_00000010/``: DeepSpeed ZeRO-1/2/3 files + ``config.yaml``),
* a folder written by ``VLM.save_pretrained`` (``model_config.yaml`` + ``model.safetensors``;
  a run's ``model/``, an ``mmsmall import`` output),
* a folder exported in our HF format (``config.json`` with ``model_type: mmsmall``),
* a stock transformers Molmo2 folder (``model_type: molmo2``), prompted through its chat template,
* an adapter-only export (``adapters.json``): the base model recorded in it, with the adapters merged.

Every kind goes the same way: what to build (a model config, its tokenizer, the stored LLM /
vision configs that spare a download) -> one build (``VLM``, without hub weights unless a config
asks for them) -> the weights filled in. Switches: ``weights=False`` stops before the weights;
``zero3=<filled DeepSpeed config>`` builds partitioned (transformers' LLM inside
``zero.Init``, the rest partitioned right after) and loads a saved folder's weights straight into
the slices (``load_partitioned``). Training (``train/zero_init``), export (``load_vlm``), eval,
chat and predict (``Predictor``), plan and the HF class all call it; ``LOADS`` counts its loads by
kind (what the tests read to see that every entry point came through here).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from mmsmall.config import ConfigError, ModelConfig, RunConfig, TokenizerConfig, from_dict, load_config
from mmsmall.errors import MissingInput
from mmsmall.export.consolidate import is_ds_checkpoint

if TYPE_CHECKING:
    from mmsmall.model.vlm import VLM

log = logging.getLogger(__name__)

LOADS: Counter[str] = Counter()  # source kind -> calls of load_model (read by tests and debugging)

# Molmo2Processor attribute -> the value our image token layout (processing/tokens.py) uses.
_MOLMO2_LAYOUT = {
    "image_use_col_tokens": True,
    "use_single_crop_col_tokens": None,
    "use_single_crop_start_token": True,
}


@dataclass
class Source:
    kind: str  # config | vlm | hf | deepspeed | molmo2 | adapter
    path: Path | None = None  # the folder holding the weights
    run_dir: Path | None = None  # the training run, when known (for the model card)
    cfg: ModelConfig | None = None  # kind "config": the model to build
    tokenizer: Any = None  # kind "config": build with this tokenizer (default: cfg.tokenizer's)
    configs: tuple[dict | None, dict | None] = (None, None)  # kind "config": stored (llm, vision) configs
    chat_template: bool = True  # kind "molmo2": prompt through the folder's chat template


@dataclass
class _Plan:
    """What one source builds, and how its weights arrive."""

    cfg: ModelConfig
    tokenizer: Any
    configs: tuple[dict | None, dict | None] = (None, None)
    fill: Callable[[nn.Module, dict | None], None] | None = None  # (model, zero3 config) -> weights in
    lora: Any = None  # train.lora of a LoRA run's checkpoint: adapters put on before its weights
    extra: dict = field(default_factory=dict)


def resolve_source(src: str | Path | Source | ModelConfig) -> Source:
    """Classify ``src`` (see module docstring); raises MissingInput saying what was expected."""
    if isinstance(src, Source):
        return src
    if isinstance(src, ModelConfig):
        return Source("config", cfg=src)
    p = Path(src)
    if not p.exists():
        raise MissingInput(f"model source {p} does not exist")
    from mmsmall.model.lora import is_adapter_folder

    if is_adapter_folder(p):
        return Source("adapter", p)
    if (p / "model_config.yaml").exists() and (p / "model.safetensors").exists():
        return Source("vlm", p)
    if (p / "config.json").exists():
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
        if model_type in ("mmsmall", "molmo2"):
            return Source("hf" if model_type == "mmsmall" else "molmo2", p)
    if is_ds_checkpoint(p):
        run = p.parent.parent if p.parent.name == "checkpoints" else None
        return Source("deepspeed", p, run)
    from mmsmall.export.intact import find_resume

    for root in (p / "checkpoints", p):
        if not (root / "latest").exists() and not any(root.glob("step_*")):
            continue
        point = find_resume(root)  # the newest verified checkpoint, as a restart would take it
        for note in point.notes:
            log.warning("load: %s", note)
        if point.tag is None or not is_ds_checkpoint(root / point.tag):
            raise MissingInput(f"{root}: no intact checkpoint ({'; '.join(point.notes) or 'none saved'})")
        return Source("deepspeed", root / point.tag, root.parent if root.name == "checkpoints" else None)
    raise MissingInput(
        f"{p}: not a run folder (checkpoints/latest), checkpoint root (latest), checkpoint folder "
        "(*_model_states.pt + config.yaml), VLM.save_pretrained folder (model_config.yaml + model.safetensors) "
        "or exported HF folder (config.json)"
    )


def load_model(
    src: str | Path | Source | ModelConfig,
    *,
    weights: bool = True,
    zero3: dict | None = None,
    merge_lora: bool = True,
    adjust: Callable[[ModelConfig, Source], ModelConfig] | None = None,
) -> VLM:
    """The VLM behind ``src`` (see module docstring): fp32 and in eval mode when loaded from a
    folder, as built (train mode) from a config.

    ``weights=False``: built, not loaded (a config: no hub weights either). ``zero3``: the filled
    DeepSpeed config of a ZeRO-3 run; the model is built partitioned (``model.hf_ds_config`` keeps
    transformers' view of it alive) and a saved folder's weights go straight into the slices;
    folders of other kinds are refused (convert them once with ``mmsmall export``). ``merge_lora``:
    a LoRA run's checkpoint with its adapters folded in (else they stay peft layers). ``adjust``:
    changes the folder's model config before the build (settings that keep every shape: a later
    training stage's processing, ``mmsmall.train.stage``).
    """
    source = resolve_source(src)
    LOADS[source.kind] += 1
    if zero3 is not None and source.kind not in ("config", "vlm"):
        raise ConfigError(
            f"{source.path} is a {source.kind} folder, which ZeRO-3 cannot load partitioned; convert it once "
            f"(`mmsmall export {source.path} OUT` or `mmsmall import`) and load OUT"
        )
    if source.kind == "adapter":  # an adapter-only export: put on the base recorded in it
        from mmsmall.model.lora import adapter_base, load_adapter

        return load_adapter(source.path, load_model(adapter_base(source.path)))
    plan = _PLANS[source.kind](source)
    if adjust is not None:
        plan.cfg = adjust(plan.cfg, source)
    model = _build(plan, hub=weights and source.kind == "config", zero3=zero3)
    if source.kind == "config":
        return model
    if plan.lora is not None:
        from mmsmall.model.lora import inject_lora

        inject_lora(model, plan.lora)
    if not weights:
        return model
    plan.fill(model, zero3)
    if plan.lora is not None and merge_lora:
        from mmsmall.model.lora import merge_lora as merge

        merge(model)
    return model.eval() if zero3 is not None else model.float().eval()


def load_vlm(src: str | Path, merge_lora: bool = True) -> tuple[VLM, Source]:
    """``load_model(src)`` and the resolved :class:`Source` (export writes its model card from it)."""
    source = resolve_source(src)
    return load_model(source, merge_lora=merge_lora), source


# ----------------------------------------------------------------------------- the build


def _build(plan: _Plan, hub: bool, zero3: dict | None) -> VLM:
    """One build for every kind: ``hub`` keeps the config's hub names (pretrained tower and LLM
    are read), otherwise every hub reference is replaced by a config (``offline_config``)."""
    from mmsmall.model.vlm import VLM, offline_config

    keep = None
    if zero3 is not None:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(zero3)  # from here on transformers builds partitioned
    if hub:
        model = VLM(plan.cfg, plan.tokenizer)
    else:
        model = VLM(offline_config(plan.cfg, *plan.configs), plan.tokenizer)
        model.cfg = plan.cfg  # keeps the config's names (model card, next save)
    if zero3 is not None:
        import deepspeed

        deepspeed.zero.Init(module=model, config_dict_or_path=zero3)  # what was built whole
        model.hf_ds_config = keep  # transformers reads ZeRO-3 from it only while it is alive
    return model


# ----------------------------------------------------------------------------- per kind: what to build


def _plan_config(source: Source) -> _Plan:
    from mmsmall.processing.tokenizer import build_tokenizer

    cfg = source.cfg
    tok = source.tokenizer or build_tokenizer(cfg.tokenizer, cfg.llm.name)
    return _Plan(cfg, tok, source.configs)


def _plan_vlm(source: Source) -> _Plan:
    from mmsmall.model.vlm import folder_configs
    from mmsmall.processing.tokenizer import build_tokenizer

    folder = source.path
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise MissingInput(f"{weights} not found; expected a folder written by VLM.save_pretrained")
    cfg = load_config(folder / "model_config.yaml", cls=ModelConfig)

    def fill(model: nn.Module, zero3: dict | None) -> None:
        if zero3 is not None:
            load_partitioned(model, weights)
        else:
            from safetensors.torch import load_model as load_safetensors

            load_safetensors(model, str(weights), strict=True)

    return _Plan(cfg, build_tokenizer(TokenizerConfig(name=str(folder))), folder_configs(folder), fill)


def _plan_deepspeed(source: Source) -> _Plan:
    from mmsmall.export.consolidate import consolidate_deepspeed
    from mmsmall.processing.tokenizer import build_tokenizer

    ckpt = source.path
    cfg_path = ckpt / "config.yaml"
    if not cfg_path.exists():
        raise MissingInput(f"{cfg_path} missing: the checkpoint folder must hold the run's resolved config")
    run_cfg = load_config(cfg_path, cls=RunConfig)
    cfg = run_cfg.model

    def fill(model: nn.Module, zero3: dict | None) -> None:
        _load_state(
            model, consolidate_deepspeed(ckpt), f"{ckpt}: consolidated weights", "the model in config.yaml"
        )

    lora = run_cfg.train.lora if run_cfg.train.lora.enabled else None
    return _Plan(cfg, build_tokenizer(cfg.tokenizer, cfg.llm.name), fill=fill, lora=lora)


def plain_config(d: dict) -> dict:
    """A stored transformers config dict without the keys that describe the file, not the model."""
    d = dict(d)
    for k in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(k, None)
    return d


def hf_tokenizer(model_config: dict, image_token_ids: dict[str, int], folder: str | Path | None) -> Any:
    """The tokenizer of our HF format: the folder's files (else the one ``model_config`` names),
    checked against ``config.json``'s image token ids."""
    from mmsmall.processing.tokenizer import build_tokenizer

    if folder is not None and (Path(folder) / "tokenizer_config.json").exists():
        tok = build_tokenizer(TokenizerConfig(name=str(folder)))
    else:
        tok = build_tokenizer(from_dict(TokenizerConfig, dict(model_config.get("tokenizer", {}))))
    wrong = {t: (i, tok.convert_tokens_to_ids(t)) for t, i in image_token_ids.items()}
    wrong = {t: v for t, v in wrong.items() if v[0] != v[1]}
    if wrong:
        raise ValueError(
            f"the tokenizer does not match config.json: image token ids (config, tokenizer) {wrong}; "
            "keep the tokenizer files that were exported with the model"
        )
    return tok


def _plan_hf(source: Source) -> _Plan:
    from mmsmall.export.safetensors_io import load_sharded, verify_shards

    folder = source.path
    verify_shards(folder)
    raw = json.loads((folder / "config.json").read_text())
    cfg = from_dict(ModelConfig, dict(raw["model_config"]), "config.json:model_config")
    vision = raw.get("vision_config")
    configs = (plain_config(raw["text_config"]), plain_config(vision) if vision is not None else None)
    tok = hf_tokenizer(raw["model_config"], raw.get("image_token_ids", {}), folder)

    def fill(model: nn.Module, zero3: dict | None) -> None:
        state = load_sharded(folder, verify=False)  # verified above
        state = {k.removeprefix("vlm."): v for k, v in state.items()}  # the HF class wraps the VLM as .vlm
        _load_state(model, state, f"{folder}: weights", "the config")

    return _Plan(cfg, tok, configs, fill)


def _plan_molmo2(source: Source) -> _Plan:
    """A stock transformers Molmo2 folder: its config and processor give our model config, its
    weights are mapped by ``molmo2.from_molmo2_state_dict``; refused with the reason when our VLM
    or token layout cannot express it (:class:`~mmsmall.export.molmo2.Molmo2Incompatible`)."""
    from transformers import AutoConfig, AutoProcessor

    from mmsmall.export.molmo2 import Molmo2Incompatible, from_molmo2_state_dict, model_config_from_molmo2
    from mmsmall.export.safetensors_io import verify_shards
    from mmsmall.processing.tokenizer import build_tokenizer

    path = source.path
    verify_shards(path)
    processor = AutoProcessor.from_pretrained(str(path))
    if source.chat_template:
        wrong = [
            f"{k}={getattr(processor, k, v)!r} (mmsmall lays image tokens out with {k}={v!r})"
            for k, v in _MOLMO2_LAYOUT.items()
            if getattr(processor, k, v) != v
        ]
        if wrong:
            raise Molmo2Incompatible("processor settings mmsmall cannot reproduce: " + "; ".join(wrong))
    cfg = model_config_from_molmo2(
        AutoConfig.from_pretrained(str(path)), processor.image_processor, str(path)
    )
    cfg.point_format = "molmo2"  # Molmo2 points in its coords text: fine-tunes and eval keep it
    tok = build_tokenizer(cfg.tokenizer)
    if source.chat_template:
        template = getattr(processor, "chat_template", None) or tok.chat_template
        if template:
            tok.chat_template = template
            cfg.prompt = "chat_template"
        else:
            log.warning("%s has no chat template: the model is prompted in mmsmall's format", path)

    def fill(model: nn.Module, zero3: dict | None) -> None:
        from transformers import Molmo2ForConditionalGeneration

        molmo = Molmo2ForConditionalGeneration.from_pretrained(
            str(path), use_safetensors=True, dtype=torch.float32
        )
        from_molmo2_state_dict(molmo, model)

    return _Plan(cfg, tok, fill=fill)


_PLANS: dict[str, Callable[[Source], _Plan]] = {
    "config": _plan_config,
    "vlm": _plan_vlm,
    "deepspeed": _plan_deepspeed,
    "hf": _plan_hf,
    "molmo2": _plan_molmo2,
}


# ----------------------------------------------------------------------------- weights in


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], what: str, fits: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{what} do not fit {fits}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_partitioned(model: nn.Module, path: str | Path) -> None:
    """Load a ``VLM.save_pretrained`` safetensors file into a ZeRO-3 partitioned model, strictly.

    Names and shapes are checked on every rank before any collective. Then, module by module,
    every rank gathers the module's own parameters, rank 0 copies the file's tensors in, and
    leaving ``GatheredParameters(modifier_rank=0)`` cuts rank 0's values into every rank's slice.
    Persistent buffers (never partitioned) are read on every rank.
    """
    import deepspeed
    from safetensors import safe_open

    from mmsmall.model.params import full_shape

    rank = dist.get_rank() if dist.is_initialized() else 0
    names: dict[int, list[str]] = {}  # a tied parameter has several names; the file holds one
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    buffers = [
        (f"{prefix}.{b}" if prefix else b, module, b)
        for prefix, module in model.named_modules()
        for b, t in module._buffers.items()
        if t is not None and b not in module._non_persistent_buffers_set
    ]
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        key_of = {pid: next((n for n in ns if n in keys), None) for pid, ns in names.items()}
        missing = [names[pid][0] for pid, k in key_of.items() if k is None]
        missing += [name for name, _, _ in buffers if name not in keys]
        known = {n for ns in names.values() for n in ns} | {name for name, _, _ in buffers}
        unexpected = sorted(keys - known)
        shapes = {id(p): full_shape(p) for p in model.parameters()}
        wrong = [
            f"{k} {tuple(f.get_slice(k).get_shape())} != {shapes[pid]}"
            for pid, k in key_of.items()
            if k is not None and tuple(f.get_slice(k).get_shape()) != shapes[pid]
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path} does not fit the model built from its folder: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
            )
        done: set[int] = set()
        with torch.no_grad():
            for module in model.modules():
                params = [p for p in module.parameters(recurse=False) if id(p) not in done]
                done.update(id(p) for p in params)
                if params:
                    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                        if rank == 0:
                            for p in params:
                                p.data.copy_(f.get_tensor(key_of[id(p)]))
        for name, module, b in buffers:
            module._buffers[b].copy_(f.get_tensor(name))
    log.info("loaded %s into the partitioned model (%d tensors)", path, len(keys))
