"""Vision towers: open_clip or transformers ViTs behind one interface.

A tower takes Molmo2-style patchified crops ``(N, P, 3*ps*ps)`` (each patch flattened as
``(row, col, channel)``, exactly what ``Molmo2ImageProcessor`` emits), rebuilds the images
``(N, 3, H, W)``, runs the ViT and returns the patch features of the chosen layers concatenated
on the last dim ``(N, P, D * len(layers))`` with the CLS / prefix tokens dropped.

Layer indexing follows transformers' Molmo2: with ``hidden_states = [embeddings, block_0, ...,
block_{L-1}]``, index ``k >= 0`` is ``hidden_states[k + 1]`` (the output of block ``k``) and
``k < 0`` is ``hidden_states[k]`` (``-1`` = the last block). Blocks after the deepest chosen
layer never influence the output, so they are removed at build time (Molmo2 does the same).

Backends live in ``VISION_BACKENDS`` (name -> builder); each builder returns a ``_Backbone``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mmsmall.config import ImageConfig, VisionConfig

logger = logging.getLogger(__name__)


class _Backbone(nn.Module):
    """What a backend provides: a ViT returning the hidden states of given blocks."""

    hidden_size: int
    num_heads: int
    patch_size: int
    image_size: tuple[int, int]
    num_blocks: int  # blocks in the tower as built, before pruning

    def prune(self, keep_blocks: int) -> None:  # keep blocks [0, keep_blocks)
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool) -> None:
        raise NotImplementedError

    def block_outputs(self, images: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        """images (N, 3, H, W) -> one (N, n_patches, D) tensor per block index, prefix tokens dropped."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- open_clip


class _OpenClipBackbone(_Backbone):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        import open_clip

        if cfg.custom is not None:
            missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg.custom]
            if missing:  # open_clip would skip such a config silently and then not find the name
                raise ValueError(
                    f"model.vision.custom lacks {missing}; an open_clip model config needs embed_dim, "
                    "vision_cfg and text_cfg (see configs/model/tiny.yaml)"
                )
            # Register the config dict under cfg.name through open_clip's own config registry.
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{cfg.name}.json"
                path.write_text(json.dumps(cfg.custom))
                open_clip.add_model_config(path)
                model = open_clip.create_model(
                    cfg.name, pretrained=cfg.pretrained, device=torch.get_default_device()
                )
        else:
            if cfg.name not in open_clip.list_models():
                raise ValueError(
                    f"model.vision.name={cfg.name!r} is not an open_clip model config; valid names are "
                    f"open_clip.list_models() (e.g. ViT-L-14-336, ViT-SO400M-14-SigLIP2-378), or give "
                    f"model.vision.custom with an open_clip config dict"
                )
            model = open_clip.create_model(
                cfg.name, pretrained=cfg.pretrained, device=torch.get_default_device()
            )
        self.visual = model.visual  # keep only the image tower; the text tower is dropped here
        del model
        self.visual.output_tokens = False
        trunk = getattr(self.visual, "trunk", None)  # timm-based towers (SigLIP family)
        if trunk is not None:
            self.num_blocks = len(trunk.blocks)
            self.hidden_size = int(trunk.embed_dim)
            self.num_heads = int(trunk.blocks[0].attn.num_heads)
            self.patch_size = int(trunk.patch_embed.patch_size[0])
            self.image_size = tuple(int(s) for s in trunk.patch_embed.img_size)
        else:
            blocks = self.visual.transformer.resblocks
            self.num_blocks = len(blocks)
            self.hidden_size = int(self.visual.transformer.width)
            self.num_heads = int(blocks[0].attn.num_heads)
            self.patch_size = int(self.visual.patch_size[0])
            self.image_size = tuple(int(s) for s in self.visual.image_size)

    def prune(self, keep_blocks: int) -> None:
        # The towers' own APIs: truncate blocks, drop the final norm and pooling / projection head.
        keep = list(range(keep_blocks))
        trunk = getattr(self.visual, "trunk", None)
        if trunk is not None:  # open_clip's TimmModel has no prune; timm's trunk does
            trunk.prune_intermediate_layers(keep, prune_norm=True, prune_head=True)
        else:
            self.visual.prune_intermediate_layers(keep, prune_norm=True, prune_head=True)

    def set_grad_checkpointing(self, enable: bool) -> None:
        self.visual.set_grad_checkpointing(enable)

    def block_outputs(self, images: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        out = self.visual.forward_intermediates(
            images, indices=blocks, stop_early=True, intermediates_only=True, output_fmt="NLC"
        )
        feats = out["image_intermediates"]  # each (N, n_patches, D), prefix tokens already split off
        order = sorted(blocks)  # forward_intermediates returns them in block order
        return [feats[order.index(b)] for b in blocks]


# ----------------------------------------------------------------------------- transformers


def _hf_vision_classes() -> dict[str, tuple[type, type]]:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    return {
        "clip_vision_model": (CLIPVisionConfig, CLIPVisionModel),
        "siglip_vision_model": (SiglipVisionConfig, SiglipVisionModel),
    }


class _HFBackbone(_Backbone):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers import AutoConfig

        classes = _hf_vision_classes()
        if cfg.custom is not None:
            custom = dict(cfg.custom)
            model_type = custom.pop("model_type", None)
            if model_type not in classes:
                raise ValueError(
                    f"model.vision.custom.model_type={model_type!r}; valid for backend=hf: {sorted(classes)}"
                )
            config_cls, model_cls = classes[model_type]
            self.model = model_cls(config_cls.from_dict(custom))
        else:
            config = AutoConfig.from_pretrained(cfg.name)
            if hasattr(config, "vision_config") and config.model_type in ("clip", "siglip"):
                config = config.vision_config  # a full CLIP / SigLIP checkpoint: keep its image tower
            if config.model_type not in classes:
                raise ValueError(
                    f"model.vision.name={cfg.name!r} has model_type {config.model_type!r}; the hf backend "
                    f"supports {sorted(classes)} (or the clip / siglip checkpoints holding them)"
                )
            self.model = classes[config.model_type][1].from_pretrained(cfg.name, config=config)
        config = self.model.config
        self.num_blocks = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.num_heads = int(config.num_attention_heads)
        self.patch_size = int(config.patch_size)
        self.image_size = (int(config.image_size), int(config.image_size))

    def prune(self, keep_blocks: int) -> None:
        encoder = getattr(self.model, "vision_model", self.model).encoder  # transformers 5 flattened it
        encoder.layers = encoder.layers[:keep_blocks]  # the config keeps the unpruned depth

    def set_grad_checkpointing(self, enable: bool) -> None:
        if enable:
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            self.model.activation_checkpointing_disable()

    def block_outputs(self, images: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        out = self.model(pixel_values=images, output_hidden_states=True)
        hidden = out.hidden_states  # [embeddings, block_0, ...], each (N, prefix + n_patches, D)
        n_patches = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
        return [hidden[b + 1][:, -n_patches:] for b in blocks]  # CLIP's CLS token is the prefix


VISION_BACKENDS: dict[str, Callable[[VisionConfig], _Backbone]] = {
    "open_clip": _OpenClipBackbone,
    "hf": _HFBackbone,
}


# ----------------------------------------------------------------------------- the tower


def unpatchify(pixel_values: torch.Tensor, grid_h: int, grid_w: int, patch_size: int) -> torch.Tensor:
    """(N, gh*gw, ps*ps*C) patches in Molmo2's (row, col, channel) order -> images (N, C, gh*ps, gw*ps)."""
    n, p, d = pixel_values.shape
    c = d // (patch_size * patch_size)
    x = pixel_values.reshape(n, grid_h, grid_w, patch_size, patch_size, c)  # (N, gh, gw, ps_r, ps_c, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, gh, ps_r, gw, ps_c)
    return x.reshape(n, c, grid_h * patch_size, grid_w * patch_size)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`unpatchify`: images (N, C, H, W) -> (N, gh*gw, ps*ps*C)."""
    n, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(n, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, gh * gw, patch_size * patch_size * c)


class VisionTower(nn.Module):
    """A ViT returning the concatenated patch features of ``cfg.layers``.

    Attributes: ``hidden_size`` (D of one layer), ``num_heads``, ``patch_size``, ``out_dim``
    (D * len(layers)), ``layer_indices`` (absolute block indices, as Molmo2's
    ``vision_feature_layer`` with non-negative entries), ``backbone`` (the backend module).
    """

    def __init__(self, cfg: VisionConfig, image_cfg: ImageConfig):
        super().__init__()
        if cfg.backend not in VISION_BACKENDS:
            raise ValueError(f"model.vision.backend={cfg.backend!r}; valid: {sorted(VISION_BACKENDS)}")
        if not cfg.layers:
            raise ValueError("model.vision.layers is empty; give at least one layer, e.g. [-3, -10]")
        self.backbone = VISION_BACKENDS[cfg.backend](cfg)
        bb = self.backbone
        self.hidden_size, self.num_heads, self.patch_size = bb.hidden_size, bb.num_heads, bb.patch_size
        if image_cfg.patch_size != bb.patch_size:
            raise ValueError(
                f"model.image.patch_size={image_cfg.patch_size} but the vision tower {cfg.name!r} uses "
                f"{bb.patch_size}-pixel patches; set model.image.patch_size={bb.patch_size}"
            )
        if tuple(bb.image_size) != (image_cfg.crop_size, image_cfg.crop_size):
            raise ValueError(
                f"model.image.crop_size={image_cfg.crop_size} but the vision tower {cfg.name!r} takes "
                f"{bb.image_size[0]}x{bb.image_size[1]} images; set model.image.crop_size={bb.image_size[0]}"
            )
        self.grid = image_cfg.crop_size // image_cfg.patch_size  # patches per side of a crop
        n = bb.num_blocks
        bad = [k for k in cfg.layers if not -n <= k < n]
        if bad:
            raise ValueError(
                f"model.vision.layers={cfg.layers}: {bad} out of range for a tower with {n} blocks "
                f"(valid: {-n}..{n - 1}; -1 is the last block)"
            )
        self.layer_indices = [k if k >= 0 else n + k for k in cfg.layers]
        keep = max(self.layer_indices) + 1
        if keep < n:
            bb.prune(keep)
            logger.info("vision tower: kept blocks 0..%d of %d (deepest used layer)", keep - 1, n)
        self.num_blocks = keep
        self.out_dim = self.hidden_size * len(self.layer_indices)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (both backends, non-reentrant)."""
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, P, 3*ps*ps) -> features (N, P, D * len(layers))."""
        n, p, _ = pixel_values.shape
        if p != self.grid * self.grid:
            raise ValueError(
                f"pixel_values has {p} patches per crop; the tower expects {self.grid}x{self.grid}="
                f"{self.grid**2} (crop_size / patch_size); check model.image against the processor"
            )
        images = unpatchify(pixel_values.to(self.dtype), self.grid, self.grid, self.patch_size)
        feats = self.backbone.block_outputs(images, self.layer_indices)  # each (N, P, D)
        return torch.cat(feats, dim=-1)  # (N, P, D * len(layers))
