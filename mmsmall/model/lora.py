"""LoRA fine-tuning with peft: adapters on the LLM (and optionally the ViT), the connector fully trained.

``train.lora.enabled=true`` (configs/train/lora-finetune.yaml): :func:`apply_lora` (called once,
from ``engine.build_engine``) injects peft ``LoraConfig`` adapters into ``model.llm`` /
``model.vision`` in place (``inject_adapter_in_model``: no wrapper class, so every other name of
the VLM stays the same), freezes every base weight and trains only the adapters and the connector.
DeepSpeed checkpoints then hold adapters and base alike, so resume is exact.

Leaving LoRA behind: :func:`merged_state_dict` folds ``W + scale * B @ A`` (peft's
``get_delta_weight``) into plain weight names without touching the model (``VLM.save_pretrained``
of an adapted model writes these, so the run's ``model/`` folder loads with no adapter code, and
also writes ``adapter/``); :func:`merge_lora` merges in place (peft ``merge``) for export;
:func:`save_adapter` writes peft adapter folders (``llm/``, ``vision/`` loadable with
``PeftModel.from_pretrained``) plus ``connector.safetensors``.

QLoRA (4-bit base through bitsandbytes) needs a CUDA GPU and bitsandbytes; elsewhere it is refused.
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
    if not cfg.qlora:
        return
    import importlib.util

    if not torch.cuda.is_available():
        raise ValueError(
            "train.lora.qlora=true: QLoRA keeps the base weights in 4 bits with bitsandbytes, which needs a "
            "CUDA GPU; on CPU set train.lora.qlora=false (plain LoRA)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("train.lora.qlora=true needs bitsandbytes: pip install bitsandbytes (CUDA only)")
    raise NotImplementedError(
        "train.lora.qlora: 4-bit base loading is not built yet; use train.lora.qlora=false"
    )


def inject_lora(model: nn.Module, cfg: Any) -> None:
    """Add LoRA layers (``train.lora``) to ``model.llm`` / ``model.vision`` in place (no freezing)."""
    from peft import inject_adapter_in_model

    if any(hasattr(p, "ds_numel") for p in model.parameters()):
        raise ValueError(
            "train.lora with ZeRO-3: the adapters are added before DeepSpeed partitions the model, which "
            "ZeRO-3 does at construction; use train.deepspeed=configs/deepspeed/zero2.json (LoRA's "
            "optimizer state is small, ZeRO-2 is what it needs)"
        )
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
    _check_qlora(cfg)
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
    """Fold every adapter into its base layer (peft ``merge``) and put the plain layer back, in place."""
    for name, layer in _lora_layers(model):
        layer.merge(adapter_names=[ADAPTER])
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, layer.get_base_layer())
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights with adapters folded in, under the un-adapted names; ``model`` is left unchanged.

    Tied tensors appear once (under their first name), as ``safetensors.torch.save_model`` writes them.
    """
    layers = dict(_lora_layers(model))
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if "lora_" in key:
                continue
            plain = key.replace(".base_layer.", ".")
            mod_name, _, pname = plain.rpartition(".")
            if pname == "weight" and mod_name in layers:
                t = t + layers[mod_name].get_delta_weight(ADAPTER).to(t.dtype)
            elif t.data_ptr() in seen and t.numel():
                continue
            seen.add(t.data_ptr())
            out[plain] = t.detach().to("cpu").contiguous().clone()
    return out


def save_adapter(model: nn.Module, out: str | Path) -> Path:
    """peft adapter folders ``out/llm`` (and ``out/vision``) + ``out/connector.safetensors``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ADAPTED:
        module = getattr(model, name)
        peft_cfg = getattr(module, "peft_config", {}).get(ADAPTER)
        if peft_cfg is None:
            continue
        folder = out / name
        peft_cfg.save_pretrained(str(folder))
        sd = get_peft_model_state_dict(module, adapter_name=ADAPTER)
        save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in sd.items()},
                  str(folder / "adapter_model.safetensors"))  # fmt: skip
        written.append(name)
    if not written:
        raise ValueError("the model has no LoRA adapters to save (train.lora.enabled was false)")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.connector.state_dict().items()},
              str(out / "connector.safetensors"))  # fmt: skip
    (out / "adapters.json").write_text(
        json.dumps({"adapters": written, "connector": "connector.safetensors"}) + "\n"
    )
    return out
