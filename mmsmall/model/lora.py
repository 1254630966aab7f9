"""LoRA fine-tuning with peft: adapters on the LLM (and optionally the ViT), the connector fully trained.

``train.lora.enabled=true`` (configs/train/lora-finetune.yaml): :func:`apply_lora` (called once,
from ``engine.set_trainable``) injects peft ``LoraConfig`` adapters into ``model.llm`` /
``model.vision`` in place (``inject_adapter_in_model``: no wrapper class, so every other name of
the VLM stays the same), freezes every base weight and trains only the adapters and the connector.
DeepSpeed checkpoints then hold adapters and base alike, so resume is exact.

Leaving LoRA behind: :func:`merged_state_dict` folds ``W + scale * B @ A`` (peft's
``get_delta_weight``) into plain weight names without touching the model (``VLM.save_pretrained``
of an adapted model writes these, so the run's ``model/`` folder loads with no adapter code, and
also writes ``adapter/``); :func:`merge_lora` merges in place (peft ``merge``) for export;
:func:`save_adapter` writes peft adapter folders (``llm/``, ``vision/`` loadable with
``PeftModel.from_pretrained``) plus ``connector.safetensors``.

QLoRA (``train.lora.qlora=true``, the ``qlora`` extra): :func:`quantize_base` first swaps every
``nn.Linear`` of the LLM but its head for a bitsandbytes NF4 ``Linear4bit`` (double-quantized
statistics, as the QLoRA paper), so peft puts its 4-bit LoRA layers on them. bitsandbytes runs
4-bit matmuls on CUDA and, slower, on CPU (its torch backend): the same code trains either way,
and the tests run it on CPU. Checkpoints hold the 4-bit weights with their quantization
statistics; loading one back rebuilds each ``Params4bit`` from them (:func:`_load_prequantized`),
so resume is exact. Leaving it, the base is dequantized (``dequantize_4bit``) before the adapters
are added, and the export is a plain full-precision model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ADAPTED = ("llm", "vision")
ADAPTER = "default"  # peft's adapter name
LORA_ZERO3 = (
    "the adapters are added before DeepSpeed partitions the model, which ZeRO-3 does at construction; "
    "use train.deepspeed=configs/deepspeed/zero2.json (LoRA's optimizer state is small, ZeRO-2 is "
    "what it needs)"
)


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    """True when peft LoRA layers are injected anywhere in ``model``."""
    return bool(_lora_layers(model))


def _peft_config(mcfg: Any):
    from peft import LoraConfig

    return LoraConfig(
        r=mcfg.rank,
        lora_alpha=mcfg.alpha,
        lora_dropout=mcfg.dropout,
        target_modules=list(mcfg.target_modules),
    )


def _check_qlora(cfg: Any) -> None:
    import importlib.util

    if cfg.qlora and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "train.lora.qlora=true needs bitsandbytes: pip install 'mmsmall[qlora]' (or bitsandbytes)"
        )


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


def four_bit_targets(llm: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The layers QLoRA stores in 4 bits: every ``nn.Linear`` of ``llm`` but ``lm_head``."""
    return [
        (name, m)
        for name, m in llm.named_modules()
        if type(m) is nn.Linear and name.rpartition(".")[2] != "lm_head"
    ]


NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256  # bitsandbytes' blocksizes for the weights and their absmax


def nf4_bytes(numel: int) -> int:
    """Bytes of one weight of ``numel`` elements as ``quantize_base`` stores it (bitsandbytes NF4,
    double-quantized): two 4-bit values per byte, one 8-bit absmax per 64-element block, and for
    those absmax one fp32 absmax per 256 blocks, their fp32 offset, the 256-entry fp32 code and
    the 16-entry fp32 NF4 map."""
    blocks = -(-numel // NF4_BLOCK)
    return -(-numel // 2) + blocks + 4 * -(-blocks // NF4_NESTED_BLOCK) + 4 * (1 + 256 + 16)


def quantize_base(llm: nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``llm`` but ``lm_head`` for an NF4 ``Linear4bit`` in place; returns the count."""
    import bitsandbytes as bnb

    swapped = 0
    for name, child in four_bit_targets(llm):
        q = bnb.nn.Linear4bit(
            child.in_features, child.out_features, bias=child.bias is not None, quant_type="nf4",
            compress_statistics=True, device="meta",
        )  # fmt: skip
        q.weight = bnb.nn.Params4bit(
            child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
        )
        if child.bias is not None:
            q.bias = child.bias
        q = q.to(child.weight.device)  # bitsandbytes quantizes on this move
        q.register_load_state_dict_pre_hook(_load_prequantized)
        parent, leaf = _parent(llm, name)
        setattr(parent, leaf, q)
        swapped += 1
    return swapped


def _load_prequantized(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """Loading a 4-bit layer: its ``Params4bit`` takes the saved weight and quantization statistics."""
    import bitsandbytes as bnb

    key = prefix + "weight"
    stats = {k[len(key) + 1 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(key + ".")}
    if not stats:
        if key in state_dict and state_dict[key].is_floating_point():
            raise ValueError(
                f"{key}: a full-precision weight for a 4-bit layer; load it before quantize_base, or load "
                "a checkpoint written by a QLoRA run"
            )
        return
    # in place: DeepSpeed maps each parameter object to its name, so the Params4bit must stay the same
    weight = module.weight
    weight.data = state_dict[key].to(weight.device)
    weight.quant_state = bnb.functional.QuantState.from_dict(stats, device=weight.device)
    module.quant_state = weight.quant_state


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """The full-precision weight of a ``Linear4bit`` (or a plain layer's own weight)."""
    if not _is_4bit(layer):
        return layer.weight.data
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def inject_lora(model: nn.Module, cfg: Any) -> None:
    """Add LoRA layers (``train.lora``) to ``model.llm`` / ``model.vision`` in place (no freezing); with
    ``qlora`` the LLM's base layers are quantized to 4 bits first."""
    from peft import inject_adapter_in_model

    if any(hasattr(p, "ds_numel") for p in model.parameters()):
        raise ValueError(f"train.lora with ZeRO-3: {LORA_ZERO3}")
    _check_qlora(cfg)
    if cfg.qlora:  # the 4-bit base goes in first, so that peft wraps the 4-bit layers
        log.info("QLoRA: %d LLM Linear layers quantized to NF4", quantize_base(model.llm))
    for name in ADAPTED:
        mcfg = getattr(cfg, name)
        if mcfg.rank <= 0:
            continue
        if not mcfg.target_modules:
            raise ValueError(
                f"train.lora.{name}.rank={mcfg.rank} but target_modules is empty; name its Linear layers"
            )
        try:
            inject_adapter_in_model(_peft_config(mcfg), getattr(model, name), adapter_name=ADAPTER)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            raise ValueError(f"train.lora.{name}.target_modules={mcfg.target_modules}: {e}") from None


def apply_lora(model: nn.Module, cfg: Any) -> dict[str, int]:
    """Inject the adapters, then train only them and the connector; returns trainable counts per module."""
    inject_lora(model, cfg)
    counts: dict[str, int] = {}
    for name, module in model.named_children():
        for pname, p in module.named_parameters():
            p.requires_grad_(name == "connector" or (name in ADAPTED and "lora_" in pname))
        counts[name] = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.parameters())
        log.info("LoRA: %-9s %12s of %12s params trainable", name, f"{counts[name]:,}", f"{total:,}")
    return counts


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    head, _, leaf = name.rpartition(".")
    return (model.get_submodule(head) if head else model), leaf


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put a plain layer back, in place.

    A 4-bit (QLoRA) base is dequantized first, and 4-bit layers without adapters become plain
    ``nn.Linear`` too, so the result holds no bitsandbytes or peft layer.
    """
    for name, layer in _lora_layers(model):
        parent, leaf = _parent(model, name)
        base = layer.get_base_layer()
        if _is_4bit(base):
            delta = layer.get_delta_weight(ADAPTER)
            weight = _dequantized(base)
            setattr(parent, leaf, _plain_linear(weight + delta.to(weight.dtype), base.bias))
        else:
            layer.merge(adapter_names=[ADAPTER])
            setattr(parent, leaf, base)
    for name, layer in list(model.named_modules()):
        if _is_4bit(layer):
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, _plain_linear(_dequantized(layer), layer.bias))
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights with adapters folded in, under the un-adapted names; ``model`` is left unchanged.

    Tied tensors appear once (under their first name), as ``safetensors.torch.save_model`` writes them.
    """
    layers = dict(_lora_layers(model))
    four_bit = {f"{n}.weight": m for n, m in model.named_modules() if _is_4bit(m)}
    statistics = tuple(f"{k}." for k in four_bit)  # "<layer>.weight.absmax", "...quant_map", ...
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if "lora_" in key or key.startswith(statistics):
                continue  # adapters, and the quantization statistics of a 4-bit weight
            if key in four_bit:
                t = _dequantized(four_bit[key])
            plain = key.replace(".base_layer.", ".")
            mod_name, _, pname = plain.rpartition(".")
            if pname == "weight" and mod_name in layers:
                t = t + layers[mod_name].get_delta_weight(ADAPTER).to(t.dtype)
            elif t.data_ptr() in seen and t.numel():
                continue
            seen.add(t.data_ptr())
            out[plain] = t.detach().to("cpu").contiguous().clone()
    return out


ADAPTERS_JSON = "adapters.json"


def save_adapter(model: nn.Module, out: str | Path, base: str | Path | None = None) -> Path:
    """peft adapter folders ``out/llm`` (and ``out/vision``) + ``out/connector.safetensors``.

    ``base``: the model folder the adapters were trained on (``train.init_from``); it is recorded
    as peft's ``base_model_name_or_path`` and, with its :func:`weights_fingerprint`, in
    ``adapters.json``, so :func:`load_adapter` refuses any other base. The adapters name mmsmall's
    module layout (``llm.model.layers.N.self_attn.q_proj``), not a stock Molmo2 release's.
    """
    import copy

    from peft import get_peft_model_state_dict

    from mmsmall.export.safetensors_io import save_safetensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ADAPTED:
        module = getattr(model, name)
        peft_cfg = getattr(module, "peft_config", {}).get(ADAPTER)
        if peft_cfg is None:
            continue
        folder = out / name
        peft_cfg = copy.copy(peft_cfg)
        peft_cfg.base_model_name_or_path = str(base) if base is not None else None
        peft_cfg.save_pretrained(str(folder))
        sd = get_peft_model_state_dict(module, adapter_name=ADAPTER)
        save_safetensors({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in sd.items()},
                         folder / "adapter_model.safetensors")  # fmt: skip
        written.append(name)
    if not written:
        raise ValueError("the model has no LoRA adapters to save (train.lora.enabled was false)")
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.connector.state_dict().items()},
                     out / "connector.safetensors")  # fmt: skip
    meta = {
        "adapters": written,
        "connector": "connector.safetensors",
        "layout": "mmsmall",  # module names of mmsmall's VLM; a stock Molmo2 model fuses att_proj / ff_proj
        "base_model": str(base) if base is not None else None,
        "base_fingerprint": _fingerprint(base),
    }
    (out / ADAPTERS_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _fingerprint(base: str | Path | None) -> str | None:
    from mmsmall.export.safetensors_io import ShardIntegrityError, weights_fingerprint

    if base is None or not Path(base).is_dir():
        return None
    try:
        return weights_fingerprint(base)
    except ShardIntegrityError:  # a folder without weight files of its own: nothing to compare
        return None


def is_adapter_folder(path: str | Path) -> bool:
    """True for a folder :func:`save_adapter` wrote (``mmsmall export --adapter-only``)."""
    return (Path(path) / ADAPTERS_JSON).is_file()


def adapter_base(folder: str | Path, base: str | Path | None = None) -> Path:
    """The base model folder of an adapter-only export (``base``, default: the one recorded),
    checked against the fingerprint of the weights the adapters were trained on.

    Raises :class:`~mmsmall.errors.AdapterBaseMismatch` when the base's weights are not those, and
    :class:`~mmsmall.errors.MissingInput` when no base is known or it is gone."""
    from mmsmall.errors import AdapterBaseMismatch, MissingInput

    folder = Path(folder)
    meta = json.loads((folder / ADAPTERS_JSON).read_text())
    base = base or meta.get("base_model")
    if not base or not Path(base).exists():
        raise MissingInput(
            f"{folder}: its base model {base!r} (adapters.json base_model) is not a folder here; "
            "give the folder the adapters were trained on (train.init_from of the run)"
        )
    recorded, actual = meta.get("base_fingerprint"), _fingerprint(base)
    if recorded and actual != recorded:
        raise AdapterBaseMismatch(
            f"{folder}: trained on a base with weights fingerprint {recorded[:16]}... "
            f"({meta.get('base_model')}), but {base} has {str(actual)[:16]}...; load it onto the base "
            "it was trained on"
        )
    return Path(base)


def load_adapter(folder: str | Path, vlm: nn.Module) -> nn.Module:
    """The VLM of an adapter-only export: ``vlm``, its base loaded from :func:`adapter_base`, with
    the adapters merged in and the connector replaced (fp32, eval)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from mmsmall.errors import AdapterBaseMismatch

    folder = Path(folder)
    meta = json.loads((folder / ADAPTERS_JSON).read_text())
    base = meta.get("base_model")
    for name in meta["adapters"]:
        module = getattr(vlm, name)
        inject_adapter_in_model(LoraConfig.from_pretrained(str(folder / name)), module, adapter_name=ADAPTER)
        state = load_file(folder / name / "adapter_model.safetensors")
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
        if getattr(result, "unexpected_keys", None):
            raise AdapterBaseMismatch(
                f"{folder / name}: adapter weights {result.unexpected_keys[:3]} name no layer of {base}"
            )
    vlm.connector.load_state_dict(load_file(folder / meta["connector"]))
    return merge_lora(vlm).float().eval()
