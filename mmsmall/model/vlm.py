"""The VLM: vision tower -> connector -> image features added to ``<im_patch>`` embeddings -> LLM.

Composition, not inheritance: ``vision`` (:class:`VisionTower`), ``connector``
(:class:`Connector`) and ``llm`` (any transformers ``AutoModelForCausalLM``) are plain
submodules. The attention rule comes from a :class:`Batch` (see docs/INTERFACES.md and
:func:`mmsmall.model.attention.build_attention_mask`): token i sees token j iff same row, same
``doc_ids`` (not -1), ``j <= i``, and ``conv_ids[j]`` is 0 (the shared prefix) or ``conv_ids[i]``;
with ``bidirectional_image`` the image tokens of one doc also see each other in both directions
(transformers' Molmo2 does this). ``model.llm.attn_implementation`` picks how it reaches the LLM:
``sdpa`` a boolean (B, 1, T, T) mask, ``eager`` the same as an additive float mask,
``sdpa_docwise`` documents regrouped by length so attention skips the blocks between packed
documents (:mod:`mmsmall.model.attention`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import ModelOutput

from mmsmall.config import ModelConfig, save_config
from mmsmall.model.attention import DOCWISE, build_attention_mask, doc_groups
from mmsmall.model.connector import Connector
from mmsmall.model.params import full_numel
from mmsmall.model.vision import VisionTower
from mmsmall.processing.batch import IGNORE_INDEX, MODEL_KEYS, count_targets

logger = logging.getLogger(__name__)

# Tokens that transformers' Molmo2Processor marks as image tokens (mm_token_type_ids == 1); they
# attend to each other bidirectionally.
IMAGE_TOKENS: tuple[str, ...] = (
    "<im_patch>",
    "<im_col>",
    "<im_start>",
    "<low_res_im_start>",
    "<frame_start>",
    "<im_end>",
    "<frame_end>",
    "<im_low>",
)
PATCH_TOKEN = "<im_patch>"
# Batch keys the model reads, and those it is handed but has no use for.
_PREFILL_KEYS = frozenset(MODEL_KEYS) - {"labels", "label_weights"}
_IGNORED_BATCH_KEYS = frozenset({"sample_ids", "sample_id", "image_grids", "image_num_crops"})
MASK_IMPLEMENTATIONS = ("sdpa", DOCWISE, "eager")  # LLM attention that takes the VLM's 4D mask


@dataclass
class VLMOutput(ModelOutput):
    """A dict as well as a dataclass, so that DeepSpeed's ZeRO-3 hooks see the tensors inside."""

    loss: torch.Tensor | None = None  # mean or sum of token cross-entropy over targets (None without labels)
    logits: torch.Tensor | None = None  # (B, T, V); None with keep_logits=False


class VLM(nn.Module):
    """Vision tower + connector + causal LLM (see module docstring)."""

    def __init__(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        missing = [t for t in IMAGE_TOKENS if t not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks image tokens {missing}; build it with "
                "mmsmall.processing.tokenizer.build_tokenizer()"
            )
        self.patch_id = vocab[PATCH_TOKEN]
        self.register_buffer(
            "image_token_ids", torch.tensor([vocab[t] for t in IMAGE_TOKENS]), persistent=False
        )
        self.bidirectional_image = cfg.bidirectional_image
        if cfg.llm.attn_implementation not in MASK_IMPLEMENTATIONS:
            raise ValueError(
                f"model.llm.attn_implementation={cfg.llm.attn_implementation!r}: the VLM passes a 4D "
                f"packing/conversation mask, which only {list(MASK_IMPLEMENTATIONS)} accept"
            )

        self.vision = VisionTower(cfg.vision, cfg.image)
        self.llm = _build_llm(cfg, tokenizer)
        llm_cfg = self.llm.config.get_text_config()
        self.connector = Connector(
            in_dim=self.vision.hidden_size,
            num_layers=len(self.vision.layer_indices),
            num_heads=cfg.connector.pool_heads or self.vision.num_heads,
            mlp_hidden=cfg.connector.mlp_hidden or llm_cfg.intermediate_size,
            out_dim=llm_cfg.hidden_size,
            pad_embed=cfg.connector.pad_embed,
        )
        for name in ("vision", "connector", "llm"):
            n = sum(full_numel(p) for p in getattr(self, name).parameters())
            logger.info("VLM %-9s %14s parameters", name, f"{n:,}")

    # ------------------------------------------------------------------ pieces

    def set_activation_checkpointing(
        self, enable: bool = True, modules: tuple[str, ...] = ("vision", "llm")
    ) -> None:
        """Recompute the ViT blocks and / or LLM layers in backward (non-reentrant)."""
        if "vision" in modules:
            self.vision.set_grad_checkpointing(enable)
        if "llm" in modules:
            if enable:
                self.llm.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                self.llm.activation_checkpointing_disable()

    def emittable(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits (..., V)`` with ids >= ``cfg.emit_vocab`` at -inf (input-only tokens, e.g. the
        image tokens of stock Molmo2's extra vocabulary, which its ``lm_head`` cannot score)."""
        n = self.cfg.emit_vocab
        if not n or n >= logits.shape[-1]:
            return logits
        blocked = torch.arange(logits.shape[-1], device=logits.device) >= n  # (V,)
        return logits.masked_fill(blocked, float("-inf"))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def image_features(self, pixel_values: torch.Tensor, image_token_pooling: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, P, C), image_token_pooling (M, K) -> (M_valid, H_llm)."""
        feats = self.vision(pixel_values)  # (N, P, D * n_layers)
        return self.connector(feats, image_token_pooling.to(feats.device))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_token_pooling: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> embeddings (B, T, H) with image features added at ``<im_patch>``."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, H)
        is_patch = input_ids == self.patch_id  # (B, T)
        n_placeholders = int(is_patch.sum())
        if pixel_values is None:
            if n_placeholders:
                raise ValueError(
                    f"input_ids hold {n_placeholders} {PATCH_TOKEN} tokens but the batch has no pixel_values; "
                    "encode images with the Processor, or drop the image tokens"
                )
            if self.training and torch.is_grad_enabled():
                embeds = embeds + self._zero_weighted_image_pass(embeds)
            return embeds
        if image_token_pooling is None:
            raise ValueError(
                "the batch has pixel_values but no image_token_pooling; build it with the Processor"
            )
        feats = self.image_features(pixel_values, image_token_pooling).to(embeds.dtype)  # (M, H)
        if feats.shape[0] != n_placeholders:
            raise ValueError(
                f"image feature count {feats.shape[0]} != {PATCH_TOKEN} placeholder count {n_placeholders} "
                f"in input_ids (pixel_values {tuple(pixel_values.shape)}, pooling "
                f"{tuple(image_token_pooling.shape)}); the token layout and the image preprocessing disagree "
                "(check model.image against the processor, and that sequences were not truncated inside an image)"
            )
        added = torch.zeros_like(embeds).masked_scatter(is_patch[..., None], feats)  # (B, T, H)
        return embeds + added

    def _zero_weighted_image_pass(self, embeds: torch.Tensor) -> torch.Tensor:
        """A () zero from one blank crop through the vision tower and connector.

        A training micro-batch without images still runs both towers, so under ZeRO-3 every rank
        gathers the vision and connector parameters in the same order (a rank that skipped them
        would wait in a different all-gather than the others: the text-only hang). Weighted 0,
        it changes neither the loss nor any gradient; the skipped modules' gradients are zeros.
        """
        grid, ps = self.vision.grid, self.vision.patch_size
        pixels = torch.zeros(1, grid * grid, 3 * ps * ps, dtype=self.vision.dtype, device=embeds.device)
        k = self.cfg.image.pooling_size[0] * self.cfg.image.pooling_size[1]
        pooling = torch.arange(k, device=embeds.device)[None]  # (1, K): one window of the crop
        return 0.0 * self.image_features(pixels, pooling).sum().to(embeds.dtype)

    def _llm_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.cfg.llm.attn_implementation != "eager":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def _is_image(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        return torch.isin(input_ids, self.image_token_ids) if self.bidirectional_image else None

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        conv_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_token_pooling: torch.Tensor | None = None,
        label_weights: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        keep_logits: bool = True,
        **extra,
    ) -> VLMOutput:
        """A Batch (see INTERFACES.md) -> VLMOutput; loss over labels != -100 with the usual shift.

        ``keep_logits=False`` (training): the LM head runs only at positions where some row has a
        target next, and no logits are returned; at a 152k vocabulary that saves the (B, T, V)
        fp32 logits and their gradient (2.5 GB each for one 4096-token row), since targets (the
        answers) are a small part of a sequence made mostly of image tokens.

        ``label_weights`` (B, T), aligned with ``labels`` (processing/batch.label_weights):
        each token's loss is weighted, and "mean" divides by the weights' sum.
        """
        unknown = sorted(set(extra) - _IGNORED_BATCH_KEYS)
        if unknown:
            raise TypeError(
                f"VLM.forward got unexpected batch keys {unknown}; it reads input_ids, labels, attention_mask, "
                f"position_ids, doc_ids, conv_ids, pixel_values, image_token_pooling and ignores "
                f"{sorted(_IGNORED_BATCH_KEYS)}"
            )
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}; valid: mean, sum")
        b, t = input_ids.shape
        embeds = self.embed(input_ids, pixel_values, image_token_pooling)  # (B, T, H)
        is_image = self._is_image(input_ids)
        groups = None
        if self.cfg.llm.attn_implementation == DOCWISE:
            groups = doc_groups(attention_mask, doc_ids, conv_ids, is_image, (b, t), input_ids.device)
        if groups is not None:  # documents attend within themselves; no (B, 1, T, T) mask is built
            llm_kwargs = {"attention_mask": None, "doc_groups": groups}
        else:
            allowed = build_attention_mask(
                attention_mask, doc_ids, conv_ids, is_image, (b, t), input_ids.device
            )
            llm_kwargs = {"attention_mask": self._llm_mask(allowed, embeds.dtype)}
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, b, t, input_ids.device)
        targets = None if labels is None else labels[:, 1:]  # (B, T-1)
        weights = None if label_weights is None else label_weights[:, 1:]
        if targets is not None and not keep_logits:
            keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # (K,) positions predicting a target
            llm_kwargs["logits_to_keep"] = keep
            targets = targets[:, keep]  # (B, K)
            weights = None if weights is None else weights[:, keep]
        out = self.llm(inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **llm_kwargs)
        logits = self.emittable(out.logits)  # (B, T, V), or (B, K, V) at the kept positions
        if targets is None:
            return VLMOutput(None, logits)
        predicting = logits[:, :-1] if keep_logits else logits  # aligned with targets
        # "mean" divides by the target count (the kept positions hold every target); the training
        # loop sums ("sum") and divides by the global count it draws with the micro-batches
        n_targets = count_targets(labels) if loss_reduction == "mean" else None
        loss = next_token_loss(predicting, targets, n_targets, loss_reduction, weights)
        return VLMOutput(loss, logits if keep_logits else None)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        batch: dict,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_strings: tuple[str, ...] | list[str] = (),
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Decode from a LEFT-padded batch with a KV cache; new token ids per row.

        A row stops at EOS (kept as its last token) or once its decoded text contains one of
        ``stop_strings`` (the completing token kept); the others go on.
        """
        on = {k: v.to(self.device) for k, v in batch.items() if k in _PREFILL_KEYS and v is not None}
        input_ids = on["input_ids"]  # (B, T)
        b, t = input_ids.shape
        attention_mask = on.setdefault("attention_mask", torch.ones_like(input_ids))
        if t and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate() needs a LEFT-padded batch (collate(..., left_pad=True))")
        position_ids = on.setdefault("position_ids", positions_from_mask(attention_mask, b, t, self.device))
        cache = DynamicCache(config=self.llm.config)
        out, allowed = self.prefill(**on, cache=cache, use_cache=True, logits_to_keep=1)
        # What a new token (after the last prompt token, same doc and conversation) may see: (B, T).
        prompt_keys = allowed[:, 0, -1, :]
        eos_id = self.tokenizer.eos_token_id
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_id
        next_pos = position_ids[:, -1] + 1  # (B,)
        new_tokens = torch.empty(b, 0, dtype=torch.long, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        lengths = torch.zeros(b, dtype=torch.long)
        stop_strings = tuple(s for s in stop_strings if s)
        for step in range(max_new_tokens):
            logits = self.emittable(out.logits[:, -1].float())  # (B, V)
            token = _next_token(logits, do_sample, temperature, top_p, generator)  # (B,)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            new_tokens = torch.cat([new_tokens, token[:, None]], dim=1)  # (B, step+1)
            lengths += (~done).cpu().long()
            finished = token == eos_id
            if stop_strings:
                finished = finished | self._hit_stop(new_tokens, done, stop_strings)
            done = done | finished
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            keys = torch.cat([prompt_keys, torch.ones(b, step + 1, dtype=torch.bool, device=self.device)], 1)
            out = self.decode(token[:, None], keys, (next_pos + step)[:, None], cache)
        return [new_tokens[i, : int(lengths[i])].tolist() for i in range(b)]

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        conv_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_token_pooling: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[Any, torch.Tensor]:
        """The prompt pass of generation: image features merged, the Batch attention rule (image
        block bidirectional, packed docs and conversations apart) as a 4D mask, ``cache`` filled.

        input_ids (B, T); pixel_values (N, P, C); image_token_pooling (M, K). Returns the LLM's
        output (logits at the last ``logits_to_keep`` positions, all when 0) and the (B, 1, T, T)
        mask it used. Positions default to counting real tokens from 0."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, b, t, input_ids.device)
        embeds = self.embed(input_ids, pixel_values, image_token_pooling)  # (B, T, H)
        allowed = build_attention_mask(
            attention_mask, doc_ids, conv_ids, self._is_image(input_ids), (b, t), input_ids.device
        )
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=self._llm_mask(allowed, embeds.dtype),
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )
        return out, allowed

    def decode(
        self,
        input_ids: torch.Tensor,
        keys: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        use_cache: bool | None = True,
        logits_to_keep: int = 0,
    ) -> Any:
        """Decode steps after :meth:`prefill`: ``input_ids`` (B, T) see the cached positions that
        ``keys`` (B, T_past + T, bool) marks, and each other causally. Returns the LLM's output."""
        b, t = input_ids.shape
        past = keys.shape[1] - t
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
        allowed = torch.cat([keys[:, None, :past].expand(b, t, past), causal[None].expand(b, t, t)], -1)
        allowed = (allowed & keys[:, None, :])[:, None]  # (B, 1, T, T_past + T)
        dtype = self.llm.get_input_embeddings().weight.dtype
        return self.llm(
            input_ids=input_ids,
            attention_mask=self._llm_mask(allowed, dtype),
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )

    def _hit_stop(
        self, tokens: torch.Tensor, done: torch.Tensor, stop_strings: tuple[str, ...]
    ) -> torch.Tensor:
        """(B,) bool: rows not yet done whose decoded new text contains a stop string."""
        hit = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for i in (~done).nonzero().flatten().tolist():
            text = self.tokenizer.decode(tokens[i].tolist(), skip_special_tokens=False)
            hit[i] = any(s in text for s in stop_strings)
        return hit

    # ------------------------------------------------------------------ files

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``model_config.yaml``, the tokenizer, the LLM config and ``model.safetensors``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, out_dir / "model_config.yaml")
        self.tokenizer.save_pretrained(out_dir)
        # The LLM (and an HF vision tower) configs let load_model rebuild offline, without hub names.
        (out_dir / "llm_config.json").write_text(self.llm.config.to_json_string())
        if self.cfg.vision.backend == "hf":
            vision_config = self.vision.backbone.model.config.to_dict()
            # the unpruned depth, so that negative model.vision.layers resolve to the same blocks
            vision_config["num_hidden_layers"] = self.vision.backbone.num_blocks
            (out_dir / "vision_config.json").write_text(json.dumps(vision_config, indent=2))
        from mmsmall.export.safetensors_io import save_safetensors
        from mmsmall.model.lora import has_lora, merged_state_dict, save_adapter

        if has_lora(self):  # LoRA-trained: the adapters merged into plain weights, and kept beside them
            save_safetensors(
                merged_state_dict(self), out_dir / "model.safetensors", metadata={"format": "pt"}
            )
            save_adapter(self, out_dir / "adapter")
        else:
            save_safetensors(self, out_dir / "model.safetensors")
        return out_dir


def offline_config(cfg: ModelConfig, llm: dict | None = None, vision: dict | None = None) -> ModelConfig:
    """``cfg`` with every hub weight reference replaced, so that building it downloads no weights
    (what ``mmsmall.export.load.load_model`` builds for weights loaded next, and what ``plan`` sizes).

    The tower is random-init (``pretrained=None``); ``vision`` (a tower config dict) and ``llm`` (an
    LLM config dict, e.g. a saved ``llm_config.json``) replace the hub names when given; a hub LLM
    name without ``llm`` becomes its ``AutoConfig`` (the config only).
    """
    vision_cfg = replace(cfg.vision, pretrained=None)
    if vision is not None:
        vision_cfg = replace(vision_cfg, custom=vision)
    llm_cfg = cfg.llm
    if llm is not None:
        llm_cfg = replace(llm_cfg, name=None, custom=llm)
    elif llm_cfg.custom is None and llm_cfg.name is not None:
        from transformers import AutoConfig

        text = AutoConfig.from_pretrained(llm_cfg.name).get_text_config()  # a VLM's config: its LLM's
        llm_cfg = replace(llm_cfg, name=None, custom=text.to_dict())
    return replace(cfg, vision=vision_cfg, llm=llm_cfg)


def folder_configs(model_dir: str | Path) -> tuple[dict | None, dict | None]:
    """``(llm, vision)`` config dicts a ``save_pretrained`` folder holds (``llm_config.json``,
    ``vision_config.json``; None where absent), for a build without downloads (``offline_config``)."""
    model_dir = Path(model_dir)
    llm_json, vision_json = model_dir / "llm_config.json", model_dir / "vision_config.json"
    return (
        json.loads(llm_json.read_text()) if llm_json.exists() else None,
        json.loads(vision_json.read_text()) if vision_json.exists() else None,
    )


# ----------------------------------------------------------------------------- helpers


def custom_llm_config(custom: dict) -> PreTrainedConfig:
    """The transformers config of a ``model.llm.custom`` dict (random-init LLMs)."""
    if "model_type" not in custom:
        raise ValueError("model.llm.custom needs a model_type (e.g. qwen2, olmo2, llama)")
    return AutoConfig.for_model(**custom)


def _build_llm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    attn = cfg.llm.attn_implementation
    if cfg.llm.custom is not None:
        custom = dict(cfg.llm.custom)
        custom["vocab_size"] = max(int(custom.get("vocab_size") or 0), len(tokenizer))
        custom.update(ids)
        llm = AutoModelForCausalLM.from_config(custom_llm_config(custom), attn_implementation=attn)
    else:
        llm = AutoModelForCausalLM.from_pretrained(
            cfg.llm.name, attn_implementation=attn, dtype=torch.float32
        )
        for key, value in ids.items():
            if getattr(llm.config, key, None) is None:
                setattr(llm.config, key, value)
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        logger.info("resizing LLM embeddings to %d tokens (image special tokens added)", len(tokenizer))
        llm.resize_token_embeddings(len(tokenizer))
    return llm


def next_token_loss(
    predicting: torch.Tensor,
    targets: torch.Tensor,
    n_targets: torch.Tensor | None,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``predicting`` (B, K, V) logits against ``targets`` (B, K), already aligned
    (the logits at t predict the label at t + 1); summed, or divided by ``n_targets`` for "mean".
    With ``weights`` (B, K) each token's loss is weighted, and "mean" divides by their sum."""
    if weights is None:
        loss = F.cross_entropy(
            predicting.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss / n_targets.clamp(min=1) if reduction == "mean" else loss
    per_token = F.cross_entropy(
        predicting.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B * K,), 0 where ignored
    loss = (per_token * weights.flatten().float()).sum()
    return loss / weights.float().sum().clamp(min=1e-12) if reduction == "mean" else loss


def positions_from_mask(
    attention_mask: torch.Tensor | None, b: int, t: int, device: torch.device
) -> torch.Tensor:
    """(B, T) positions counting real tokens from 0 (padding gets 0)."""
    if attention_mask is None:
        return torch.arange(t, device=device)[None].expand(b, t)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _next_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) float -> token ids (B,), greedy or temperature / nucleus sampling."""
    if not do_sample or temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
