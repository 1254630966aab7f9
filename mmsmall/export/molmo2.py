"""State-dict adapter between mmsmall's VLM and transformers' stock Molmo2 (both directions).

What maps, part by part (ours -> ``Molmo2ForConditionalGeneration``):

* Vision: an HF ``SiglipVisionModel`` tower, or an open_clip timm ViT without class token (the
  open_clip SigLIP / SigLIP2 towers, e.g. ViT-SO400M-14-SigLIP2-378) -> ``model.vision_tower``
  (``Molmo2VisionModel``); timm's fused ``qkv`` splits into q/k/v, ``proj`` -> ``o_proj``.
  The conv patch embedding ``(D, C, ps, ps)`` becomes a Linear over patches flattened as
  ``(row, col, channel)`` (the Molmo2 image processor's order): ``w.permute(0, 2, 3, 1).reshape(D, -1)``.
  Position embeddings copy 1:1 (one per patch, no class token, the crop is the tower's native size);
  encoder layer ``i`` -> ``layers.i`` (``out_proj`` -> ``o_proj``); only the blocks up to the deepest
  feature layer are kept; SigLIP's ``post_layernorm`` and attention-pool ``head`` are unused (the
  features are intermediate hidden states) and dropped. Feature layers become
  ``adapter_config.vision_feature_layer`` as absolute block indices.
* Connector -> ``model.multi_modal_projector`` (``Molmo2Adapter``), same parameter names.
* LLM -> ``model.language_model`` (``Molmo2TextModel``) + ``lm_head``:
  OLMo-2 (post-norm, RMSNorm over the whole q/k projection) is ``norm_after=True``,
  ``qk_norm_type="olmo"``, with OLMo-2's ``post_attention_layernorm`` -> ``input_layernorm`` and
  ``post_feedforward_layernorm`` -> ``post_attention_layernorm`` (Molmo2's post-norm slots);
  Qwen3 (pre-norm, per-head q/k RMSNorm) is ``norm_after=False``, ``qk_norm_type="qwen3"``, names 1:1.
  The whole vocabulary (image tokens included) lives in ``vocab_size``; ``additional_vocab_size=0``,
  so ``lm_head`` scores every token exactly as ours does.

What does not fit, and why (:func:`check_molmo2_fit` raises :class:`Molmo2Incompatible` listing all):

* CLIP-style towers (open_clip ViTs, HF CLIPVisionModel, timm ViTs with class / register tokens):
  CLIP prepends a class token and applies a pre-LayerNorm (``ln_pre`` / ``pre_layrnorm``) after the
  embeddings; Molmo2's ViT has neither. timm blocks with layer scale, q/k norm or a non-GELU MLP.
* A tower whose patch grid differs from the crop size (Molmo2 has exactly one position embedding
  per patch of a crop, never interpolated).
* Connector ``pad_embed`` (Molmo 1 padding embeddings): Molmo2 has none.
* ``bidirectional_image=false``: stock Molmo2 always lets image tokens attend both ways.
* Qwen2 / Llama / Mistral-style LLMs: they have no q/k RMSNorm (and Qwen2 has q/k/v biases);
  Molmo2's text attention always normalizes q and k with a learned RMSNorm, which cannot be made
  the identity. Attention biases on OLMo-2 / Qwen3 (``attention_bias=True``) do not fit either,
  since Molmo2's ``o_proj`` has no bias. Sliding-window attention layers do not fit.
* HF SigLIP-2 (NaFlex: resized position embeddings per image) is not mapped.

Reverse (stock Molmo2 -> ours, :func:`model_config_from_molmo2` / :func:`from_molmo2_state_dict`):
the inverse of the above. A checkpoint with ``additional_vocab_size > 0`` (the released Molmo2
models: 128 extra image tokens) gets an LLM with ``vocab_size + additional_vocab_size`` embeddings
and ``model.emit_vocab = vocab_size``: the extra ids, which stock Molmo2's ``lm_head`` cannot score,
get logit -inf (never generated, never in a softmax), and every other logit is identical. Exporting
such a model back writes ``vocab_size = emit_vocab`` and the rest as ``additional_vocab_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration, PreTrainedTokenizerBase

    from mmsmall.config import ImageConfig, ModelConfig


class Molmo2Incompatible(ValueError):
    """The model cannot be expressed as transformers' stock Molmo2; the message says why."""


# Our token string -> Molmo2Config attribute holding its id.
TOKEN_ID_FIELDS = {
    "<im_start>": "image_start_token_id",
    "<low_res_im_start>": "low_res_image_start_token_id",
    "<im_end>": "image_end_token_id",
    "<im_patch>": "image_patch_id",
    "<frame_start>": "frame_start_token_id",
    "<frame_end>": "frame_end_token_id",
}

_LLM_LAYOUT = {  # model_type -> (norm_after, qk_norm_type)
    "olmo2": (True, "olmo"),
    "qwen3": (False, "qwen3"),
}


@dataclass
class FitReport:
    reasons: list[str] = field(default_factory=list)

    def need(self, ok: bool, reason: str) -> None:
        if not ok:
            self.reasons.append(reason)

    def raise_if_any(self) -> None:
        if self.reasons:
            lines = "\n  - ".join(self.reasons)
            raise Molmo2Incompatible(
                "this model cannot be exported to the stock transformers Molmo2 format:\n  - "
                f"{lines}\nExport with --format mmsmall instead (our own HF classes load any combination), "
                "or train with a SigLIP-family HF tower (model.vision.backend=hf, SiglipVisionModel) and an "
                "OLMo-2 or Qwen3 LLM (see configs/model/tiny-molmo2.yaml)."
            )


def _siglip(vision: nn.Module) -> nn.Module | None:
    """The SiglipVisionModel inside our VisionTower, or None when the tower is not HF SigLIP."""
    from transformers import SiglipVisionModel

    return next((m for m in vision.modules() if isinstance(m, SiglipVisionModel)), None)


def _timm_vit(vision: nn.Module) -> nn.Module | None:
    """The timm VisionTransformer trunk of an open_clip timm tower (SigLIP family), if any."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    return next((m for m in vision.modules() if isinstance(m, VisionTransformer)), None)


def _timm_act(act: nn.Module) -> str | None:
    """transformers' ACT2FN name of a timm MLP activation (None: no exact equivalent)."""
    name = type(act).__name__
    if name == "GELUTanh" or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_pytorch_tanh"
    if isinstance(act, nn.GELU) or name == "GELU":
        return "gelu"
    return None


def _describe_tower(vision: nn.Module) -> str:
    from transformers import CLIPVisionModel

    if any(isinstance(m, CLIPVisionModel) for m in vision.modules()):
        return (
            "vision tower: HF CLIPVisionModel prepends a class token and applies a pre-LayerNorm "
            "(pre_layrnorm) to the embeddings; Molmo2's ViT has no class token and no pre-norm"
        )
    backbone = getattr(vision, "backbone", vision)
    visual = getattr(backbone, "visual", None)
    if visual is not None and hasattr(visual, "transformer"):
        return (
            "vision tower: this open_clip ViT is CLIP-style: it prepends a class token and applies a "
            "pre-LayerNorm (ln_pre) to the embeddings; Molmo2's ViT has neither"
        )
    return (
        f"vision tower: {type(backbone).__name__} is not a SigLIP-family tower (HF SiglipVisionModel, "
        "or an open_clip timm ViT without class token)"
    )


def _vision_reasons(vision: nn.Module) -> list[str]:
    """Why the tower does not map onto Molmo2VisionModel (empty: it does)."""
    rep = FitReport()
    grid = getattr(vision, "grid", None)
    siglip, trunk = _siglip(vision), _timm_vit(vision)
    if siglip is not None:
        vc = siglip.config
        n_pos = siglip.embeddings.position_embedding.weight.shape[0]
        rep.need(
            grid is None or grid * grid == n_pos,
            f"vision tower: {n_pos} position embeddings but crops have {grid}x{grid} patches; Molmo2 "
            "needs exactly one position embedding per patch (set model.image.crop_size to the tower's image_size)",
        )
        rep.need(vc.hidden_size % vc.num_attention_heads == 0, "vision tower: heads do not divide the width")
    elif trunk is not None:
        prefix = int(getattr(trunk, "num_prefix_tokens", 0))
        rep.need(
            getattr(trunk, "cls_token", None) is None and prefix == 0,
            f"vision tower: the timm ViT has {prefix} prefix token(s) (class / register tokens); Molmo2's "
            "ViT has none",
        )
        rep.need(
            isinstance(trunk.norm_pre, nn.Identity) and isinstance(trunk.patch_embed.norm, nn.Identity),
            "vision tower: the timm ViT normalizes the embeddings (norm_pre / patch norm); Molmo2's ViT does not",
        )
        n_pos = trunk.pos_embed.shape[1] if trunk.pos_embed is not None else 0
        rep.need(
            grid is None or grid * grid == n_pos,
            f"vision tower: {n_pos} position embeddings but crops have {grid}x{grid} patches; Molmo2 needs "
            "exactly one per patch",
        )
        rep.need(trunk.patch_embed.proj.bias is not None, "vision tower: patch embedding without bias")
        for i, blk in enumerate(trunk.blocks):
            attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
            plain = (
                attn is not None
                and mlp is not None
                and hasattr(attn, "qkv")
                and all(
                    isinstance(getattr(attn, n, nn.Identity()), nn.Identity)
                    for n in ("q_norm", "k_norm", "norm")
                )
                and all(isinstance(getattr(blk, n, nn.Identity()), nn.Identity) for n in ("ls1", "ls2"))
                and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
                and hasattr(mlp, "fc1")
                and isinstance(blk.norm1, nn.LayerNorm)
                and isinstance(blk.norm2, nn.LayerNorm)
            )
            rep.need(
                plain,
                f"vision tower: timm block {i} is not a plain pre-norm block (fused qkv, LayerNorm, no q/k "
                "norm, no layer scale, plain MLP) like Molmo2's",
            )
            if plain:
                rep.need(attn.qkv.bias is not None, f"vision tower: block {i} qkv has no bias; Molmo2's has")
                rep.need(
                    _timm_act(mlp.act) is not None,
                    f"vision tower: block {i} MLP activation {type(mlp.act).__name__} has no Molmo2 equivalent",
                )
            if not plain:
                break
    else:
        rep.need(False, _describe_tower(vision))
    return rep.reasons


def vision_to_molmo2(vision: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Molmo2VisionConfig fields (without image_size) and the weights under Molmo2VisionModel's names.

    ``vision`` is our VisionTower, or any module holding an HF SiglipVisionModel or a timm ViT trunk.
    Conv patch embeddings ``(D, C, ps, ps)`` become Linear weights over ``(row, col, channel)``-ordered
    patches: ``permute(0, 2, 3, 1).reshape(D, -1)``.
    """
    reasons = _vision_reasons(vision)
    if reasons:
        FitReport(reasons).raise_if_any()
    out: dict[str, torch.Tensor] = {}
    siglip = _siglip(vision)
    if siglip is not None:
        vc, v = siglip.config, _sd(siglip)
        conv = v["embeddings.patch_embedding.weight"]
        pos = v["embeddings.position_embedding.weight"]  # (P, D)
        conv_bias = v["embeddings.patch_embedding.bias"]
        blocks = [
            {
                "layer_norm1": (v[f"{s}layer_norm1.weight"], v[f"{s}layer_norm1.bias"]),
                "layer_norm2": (v[f"{s}layer_norm2.weight"], v[f"{s}layer_norm2.bias"]),
                "self_attn.q_proj": (v[f"{s}self_attn.q_proj.weight"], v[f"{s}self_attn.q_proj.bias"]),
                "self_attn.k_proj": (v[f"{s}self_attn.k_proj.weight"], v[f"{s}self_attn.k_proj.bias"]),
                "self_attn.v_proj": (v[f"{s}self_attn.v_proj.weight"], v[f"{s}self_attn.v_proj.bias"]),
                "self_attn.o_proj": (v[f"{s}self_attn.out_proj.weight"], v[f"{s}self_attn.out_proj.bias"]),
                "mlp.fc1": (v[f"{s}mlp.fc1.weight"], v[f"{s}mlp.fc1.bias"]),
                "mlp.fc2": (v[f"{s}mlp.fc2.weight"], v[f"{s}mlp.fc2.bias"]),
            }
            for s in (f"encoder.layers.{i}." for i in range(len(siglip.encoder.layers)))
        ]
        fields = {
            "hidden_size": vc.hidden_size,
            "intermediate_size": vc.intermediate_size,
            "num_attention_heads": vc.num_attention_heads,
            "head_dim": vc.hidden_size // vc.num_attention_heads,
            "hidden_act": vc.hidden_act,
            "layer_norm_eps": vc.layer_norm_eps,
            "patch_size": vc.patch_size,
            "num_channels": vc.num_channels,
        }
    else:
        trunk = _timm_vit(vision)
        conv, conv_bias = trunk.patch_embed.proj.weight.detach(), trunk.patch_embed.proj.bias.detach()
        pos = trunk.pos_embed.detach()[0]  # (P, D)
        blocks = []
        for blk in trunk.blocks:
            q, k, v_ = blk.attn.qkv.weight.detach().chunk(3, dim=0)  # timm packs q, k, v along dim 0
            qb, kb, vb = blk.attn.qkv.bias.detach().chunk(3, dim=0)
            blocks.append(
                {
                    "layer_norm1": (blk.norm1.weight.detach(), blk.norm1.bias.detach()),
                    "layer_norm2": (blk.norm2.weight.detach(), blk.norm2.bias.detach()),
                    "self_attn.q_proj": (q, qb),
                    "self_attn.k_proj": (k, kb),
                    "self_attn.v_proj": (v_, vb),
                    "self_attn.o_proj": (blk.attn.proj.weight.detach(), blk.attn.proj.bias.detach()),
                    "mlp.fc1": (blk.mlp.fc1.weight.detach(), blk.mlp.fc1.bias.detach()),
                    "mlp.fc2": (blk.mlp.fc2.weight.detach(), blk.mlp.fc2.bias.detach()),
                }
            )
        blk0 = trunk.blocks[0]
        fields = {
            "hidden_size": int(trunk.embed_dim),
            "intermediate_size": int(blk0.mlp.fc1.out_features),
            "num_attention_heads": int(blk0.attn.num_heads),
            "head_dim": int(blk0.attn.head_dim),
            "hidden_act": _timm_act(blk0.mlp.act),
            "layer_norm_eps": float(blk0.norm1.eps),
            "patch_size": int(trunk.patch_embed.patch_size[0]),
            "num_channels": int(conv.shape[1]),
        }
    out["patch_embedding.weight"] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)  # (D, ps*ps*C)
    out["patch_embedding.bias"] = conv_bias
    out["positional_embedding"] = pos
    for i, blk in enumerate(blocks):
        for name, (w, b) in blk.items():
            out[f"layers.{i}.{name}.weight"] = w
            out[f"layers.{i}.{name}.bias"] = b
    fields.update(
        num_hidden_layers=len(blocks), num_key_value_heads=fields["num_attention_heads"], attention_bias=True
    )
    return fields, out


def check_molmo2_fit(vlm: nn.Module) -> None:
    """Raise :class:`Molmo2Incompatible` with every reason the VLM does not fit stock Molmo2."""
    rep = FitReport(_vision_reasons(vlm.vision))
    rep.need(
        bool(getattr(vlm, "bidirectional_image", False)),
        "attention: the model was built with bidirectional_image=false (causal image tokens); stock Molmo2 "
        "lets all image tokens attend to each other (mm_token_type_ids), so its logits would differ",
    )
    conn = vlm.connector
    rep.need(
        getattr(conn, "pad_embed", None) is None,
        "connector: pad_embed (Molmo 1 padding embeddings) is on; Molmo2 has no such parameters "
        "(set model.connector.pad_embed=false)",
    )
    proj = conn.image_projector
    rep.need(
        proj.down_proj.bias is None,
        "connector: image_projector.down_proj has a bias; Molmo2's has none",
    )
    rep.need(
        (proj.gate_proj.bias is None) == (proj.up_proj.bias is None),
        "connector: gate_proj and up_proj must both have biases or both have none",
    )
    pool = conn.image_pooling_2d
    biases = {n: getattr(pool, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    rep.need(
        len(set(biases.values())) == 1,
        f"connector: image_pooling_2d biases must be all on or all off, got {biases}",
    )
    tc = vlm.llm.config
    mt = getattr(tc, "model_type", None)
    if mt not in _LLM_LAYOUT:
        why = {
            "qwen2": "Qwen2 has q/k/v biases and no q/k RMSNorm",
            "llama": "Llama has no q/k RMSNorm",
            "mistral": "Mistral has no q/k RMSNorm",
            "olmo": "OLMo-1 has non-parametric LayerNorms and no q/k RMSNorm",
            "olmo3": "OLMo-3 uses sliding-window attention layers",
        }.get(mt, f"{mt!r} is not a supported layout")
        rep.need(
            False,
            f"LLM: {why}; Molmo2's text attention always applies a learned q/k RMSNorm and has no "
            "o_proj bias, so only OLMo-2 (post-norm, olmo q/k norm) and Qwen3 (pre-norm, per-head "
            "q/k norm) map onto it",
        )
    else:
        rep.need(
            not getattr(tc, "attention_bias", False),
            f"LLM: {mt} with attention_bias=True; Molmo2's o_proj has no bias",
        )
        layer_types = getattr(tc, "layer_types", None) or []
        rep.need(
            all(t == "full_attention" for t in layer_types) and not getattr(tc, "use_sliding_window", False),
            f"LLM: {mt} uses sliding-window attention; Molmo2 attends over the full context in every layer",
        )
        rep.need(
            getattr(tc, "mlp_bias", False) is False,
            f"LLM: {mt} with mlp_bias=True; Molmo2's MLP has no biases",
        )
    rep.raise_if_any()


# ----------------------------------------------------------------------------- forward: ours -> Molmo2


def _vision_layers(vlm: nn.Module) -> list[int]:
    return [int(i) for i in vlm.vision.layer_indices]


def molmo2_config(vlm: nn.Module, tokenizer: PreTrainedTokenizerBase, crop_size: int) -> Molmo2Config:
    """The ``Molmo2Config`` describing ``vlm`` (call :func:`check_molmo2_fit` first)."""
    from transformers import Molmo2Config

    vision_fields, _ = vision_to_molmo2(vlm.vision)
    layers = _vision_layers(vlm)
    pool = vlm.connector.image_pooling_2d
    proj = vlm.connector.image_projector
    heads = pool.num_heads
    tc = vlm.llm.config
    norm_after, qk_norm = _LLM_LAYOUT[tc.model_type]
    vocab = vlm.llm.get_output_embeddings().weight.shape[0]
    n_embed = vlm.llm.get_input_embeddings().weight.shape[0]
    if n_embed != vocab:
        raise Molmo2Incompatible(
            f"LLM: input embeddings have {n_embed} rows but lm_head has {vocab}; resize them to the same size"
        )
    emit = int(getattr(vlm.cfg, "emit_vocab", 0) or vocab)  # ids from emit on are input-only
    ids = tokenizer.convert_tokens_to_ids(list(TOKEN_ID_FIELDS))
    rope = dict(getattr(tc, "rope_parameters", None) or {"rope_type": "default", "rope_theta": tc.rope_theta})
    text_head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    cfg = Molmo2Config(
        vision_config={**vision_fields, "image_size": [crop_size, crop_size]},
        adapter_config={
            "vision_feature_layer": layers,
            "hidden_size": pool.o_proj.weight.shape[0],
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": pool.head_dim,
            "attention_bias": pool.q_proj.bias is not None,
            "hidden_act": "silu",
            "intermediate_size": proj.gate_proj.weight.shape[0],
            "text_hidden_size": proj.down_proj.weight.shape[0],
            "mlp_bias": proj.gate_proj.bias is not None,
        },
        text_config={
            "hidden_size": tc.hidden_size,
            "num_attention_heads": tc.num_attention_heads,
            "num_key_value_heads": tc.num_key_value_heads,
            "head_dim": text_head_dim,
            "vocab_size": emit,
            "additional_vocab_size": vocab - emit,
            "attention_bias": False,
            "qk_norm_type": qk_norm,
            "num_hidden_layers": tc.num_hidden_layers,
            "intermediate_size": tc.intermediate_size,
            "hidden_act": tc.hidden_act,
            "max_position_embeddings": tc.max_position_embeddings,
            "rope_parameters": rope,
            "rms_norm_eps": tc.rms_norm_eps,
            "norm_after": norm_after,
            "tie_word_embeddings": False,
        },
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{TOKEN_ID_FIELDS[t]: i for t, i in zip(TOKEN_ID_FIELDS, ids)},
    )
    return cfg


def _sd(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def to_molmo2_state_dict(vlm: nn.Module) -> dict[str, torch.Tensor]:
    """Our VLM's weights under ``Molmo2ForConditionalGeneration``'s (in-memory) parameter names."""
    out: dict[str, torch.Tensor] = {}
    _, vision = vision_to_molmo2(vlm.vision)
    for k, t in vision.items():
        out["model.vision_tower." + k] = t
    for k, t in _sd(vlm.connector).items():
        out["model.multi_modal_projector." + k] = t
    norm_after = _LLM_LAYOUT[vlm.llm.config.model_type][0]
    renames = (
        {
            "post_attention_layernorm": "input_layernorm",
            "post_feedforward_layernorm": "post_attention_layernorm",
        }
        if norm_after
        else {}
    )
    dec = vlm.llm.get_decoder()
    for k, t in _sd(dec).items():
        if "rotary_emb" in k:
            continue
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] in renames:
            parts[2] = renames[parts[2]]
        out["model.language_model." + ".".join(parts)] = t
    head = vlm.llm.get_output_embeddings().weight.detach()  # (V, H)
    out["lm_head.weight"] = head[: int(getattr(vlm.cfg, "emit_vocab", 0) or head.shape[0])]
    return out


def build_molmo2_model(vlm: nn.Module, tokenizer: PreTrainedTokenizerBase, crop_size: int):
    """A ``Molmo2ForConditionalGeneration`` holding ``vlm``'s weights (fp32, eval mode)."""
    from transformers import Molmo2ForConditionalGeneration

    check_molmo2_fit(vlm)
    cfg = molmo2_config(vlm, tokenizer, crop_size)
    cfg.text_config._attn_implementation = "sdpa"
    model = Molmo2ForConditionalGeneration(cfg).float().eval()
    sd = to_molmo2_state_dict(vlm)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = [k for k in set(own) & set(sd) if own[k].shape != sd[k].shape]
    if missing or unexpected or bad_shape:
        raise Molmo2Incompatible(
            f"weight mapping to Molmo2 does not line up: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {[(k, tuple(own[k].shape), tuple(sd[k].shape)) for k in bad_shape[:5]]}"
        )
    model.load_state_dict({k: t.float() for k, t in sd.items()}, strict=True)
    return model


def _molmo2_common(image_cfg: ImageConfig) -> dict:
    """The settings Molmo2's image and video processors share, from our ``ImageConfig``."""
    return {
        "size": {"height": image_cfg.crop_size, "width": image_cfg.crop_size},
        "patch_size": image_cfg.patch_size,
        "pooling_size": list(image_cfg.pooling_size),
        "image_mean": list(image_cfg.mean),
        "image_std": list(image_cfg.std),
    }


def molmo2_image_processor(image_cfg: ImageConfig, max_crops: int | None = None):
    """transformers' stock ``Molmo2ImageProcessor`` with the settings of ``image_cfg``
    (``max_crops_eval`` crops unless ``max_crops`` is given)."""
    from transformers import Molmo2ImageProcessor

    return Molmo2ImageProcessor(
        max_crops=image_cfg.max_crops_eval if max_crops is None else max_crops,
        overlap_margins=list(image_cfg.overlap_margins),
        **_molmo2_common(image_cfg),
    )


def build_molmo2_processor(tokenizer: PreTrainedTokenizerBase, image_cfg: ImageConfig, chat_template: str):
    """A stock ``Molmo2Processor`` with our tokenizer and image settings."""
    from transformers import Molmo2Processor, Molmo2VideoProcessor

    return Molmo2Processor(
        image_processor=molmo2_image_processor(image_cfg),
        video_processor=Molmo2VideoProcessor(**_molmo2_common(image_cfg)),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )


# ----------------------------------------------------------------------------- reverse: Molmo2 -> ours


def model_config_from_molmo2(cfg: Molmo2Config, image_processor: Any, tokenizer_path: str) -> ModelConfig:
    """Our ``ModelConfig`` for a stock Molmo2 checkpoint (SigLIP-style HF tower + OLMo-2 / Qwen3 LLM)."""
    from mmsmall.config import (
        ConnectorConfig,
        ImageConfig,
        LLMConfig,
        ModelConfig,
        TokenizerConfig,
        VisionConfig,
    )

    vc, ac, tc = cfg.vision_config, cfg.adapter_config, cfg.text_config
    rep = FitReport()
    rep.need(
        vc.head_dim * vc.num_attention_heads == vc.hidden_size
        and vc.num_key_value_heads == vc.num_attention_heads,
        "vision: head_dim * heads must equal hidden_size with no grouped kv heads (SigLIP's layout)",
    )
    rep.need(vc.attention_bias, "vision: attention without biases has no SigLIP equivalent")
    rep.need(
        ac.hidden_size == vc.hidden_size, "adapter: hidden_size must equal the ViT width (our connector)"
    )
    rep.need(
        ac.head_dim * ac.num_attention_heads == ac.hidden_size
        and ac.num_key_value_heads == ac.num_attention_heads,
        "adapter: pooling head_dim * heads must equal hidden_size with no grouped kv heads",
    )
    rep.need(
        ac.attention_bias and not ac.mlp_bias and ac.hidden_act == "silu", "adapter: unsupported bias/act"
    )
    rep.need(
        list(tc.rope_scaling_layers) == list(range(tc.num_hidden_layers)),
        "text: rope scaling on only some layers has no OLMo-2 / Qwen3 equivalent",
    )
    rep.need(
        not tc.attention_bias, "text: q/k/v biases have no OLMo-2 / Qwen3 (attention_bias=False) equivalent"
    )
    layout = (tc.norm_after, tc.qk_norm_type)
    rep.need(
        layout in {(True, "olmo"), (False, "qwen3")},
        f"text: norm_after={tc.norm_after} with qk_norm_type={tc.qk_norm_type!r} is neither OLMo-2 nor Qwen3",
    )
    if rep.reasons:
        rep.reasons.insert(0, "(reverse direction: stock Molmo2 -> mmsmall)")
        rep.raise_if_any()
    crop = int(vc.image_size[0])
    n_blocks = vc.num_hidden_layers
    layers = [int(k) % n_blocks for k in ac.vision_feature_layer]
    model_type = "olmo2" if tc.norm_after else "qwen3"
    llm: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": tc.vocab_size + tc.additional_vocab_size,
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads,
        "hidden_act": tc.hidden_act,
        "max_position_embeddings": tc.max_position_embeddings,
        "rms_norm_eps": tc.rms_norm_eps,
        "rope_parameters": dict(tc.rope_parameters),
        "tie_word_embeddings": False,
        "attention_bias": False,
    }
    if model_type == "qwen3":
        llm["head_dim"] = tc.head_dim
    elif tc.head_dim * tc.num_attention_heads != tc.hidden_size:
        raise Molmo2Incompatible("text: OLMo-2 layout needs head_dim * heads == hidden_size")
    ip = image_processor
    size = ip.size["height"] if isinstance(ip.size, dict) else ip.size.height
    if size != crop:
        raise Molmo2Incompatible(f"image processor crop size {size} differs from the ViT's image_size {crop}")
    pool_h, pool_w = ip.pooling_size
    return ModelConfig(
        emit_vocab=int(tc.vocab_size) if tc.additional_vocab_size else 0,
        vision=VisionConfig(
            backend="hf",
            name="siglip-from-molmo2",
            pretrained=None,
            custom={
                "model_type": "siglip_vision_model",
                "hidden_size": vc.hidden_size,
                "intermediate_size": vc.intermediate_size,
                "num_hidden_layers": n_blocks,
                "num_attention_heads": vc.num_attention_heads,
                "num_channels": vc.num_channels,
                "image_size": crop,
                "patch_size": vc.patch_size,
                "hidden_act": vc.hidden_act,
                "layer_norm_eps": vc.layer_norm_eps,
                "vision_use_head": False,
            },
            layers=layers,
        ),
        connector=ConnectorConfig(
            pool_heads=ac.num_attention_heads,
            mlp_hidden=ac.intermediate_size,
            pad_embed=False,
        ),
        llm=LLMConfig(name=None, custom=llm),
        tokenizer=TokenizerConfig(name=tokenizer_path),
        image=ImageConfig(
            crop_size=crop,
            patch_size=vc.patch_size,
            max_crops=int(ip.max_crops),
            max_crops_eval=int(ip.max_crops),
            overlap_margins=list(ip.overlap_margins),
            pooling_size=[int(pool_h), int(pool_w)],
            mean=[float(x) for x in ip.image_mean],
            std=[float(x) for x in ip.image_std],
        ),
    )


def from_molmo2_state_dict(molmo: Molmo2ForConditionalGeneration, vlm: nn.Module) -> None:
    """Copy a stock Molmo2 model's weights into our (freshly built, matching) VLM in place."""
    sd = {k: v.detach() for k, v in molmo.state_dict().items()}
    siglip = _siglip(vlm.vision)
    pre = "model.vision_tower."
    lin = sd[pre + "patch_embedding.weight"]  # (D, ps*ps*C)
    conv = siglip.embeddings.patch_embedding.weight  # (D, C, ps, ps)
    d, c, ps, _ = conv.shape
    vis: dict[str, torch.Tensor] = {
        "embeddings.patch_embedding.weight": lin.reshape(d, ps, ps, c).permute(0, 3, 1, 2),
        "embeddings.patch_embedding.bias": sd[pre + "patch_embedding.bias"],
        "embeddings.position_embedding.weight": sd[pre + "positional_embedding"],
    }
    for i in range(len(siglip.encoder.layers)):
        for a, b in [
            ("layer_norm1", "layer_norm1"),
            ("layer_norm2", "layer_norm2"),
            ("self_attn.q_proj", "self_attn.q_proj"),
            ("self_attn.k_proj", "self_attn.k_proj"),
            ("self_attn.v_proj", "self_attn.v_proj"),
            ("self_attn.out_proj", "self_attn.o_proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]:
            for p in ("weight", "bias"):
                vis[f"encoder.layers.{i}.{a}.{p}"] = sd[f"{pre}layers.{i}.{b}.{p}"]
    missing, _ = siglip.load_state_dict(vis, strict=False)
    unused_ok = ("post_layernorm", "head.")
    still = [k for k in missing if not k.startswith(unused_ok) and "position_ids" not in k]
    if still:
        raise Molmo2Incompatible(f"reverse mapping left SigLIP weights unset: {still[:5]}")
    conn = {
        k[len("model.multi_modal_projector.") :]: t for k, t in sd.items() if "multi_modal_projector." in k
    }
    vlm.connector.load_state_dict(conn, strict=True)
    norm_after = molmo.config.text_config.norm_after
    renames = (
        {
            "input_layernorm": "post_attention_layernorm",
            "post_attention_layernorm": "post_feedforward_layernorm",
        }
        if norm_after
        else {}
    )
    dec_sd: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        if not k.startswith("model.language_model."):
            continue
        parts = k[len("model.language_model.") :].split(".")
        if parts[0] == "layers" and parts[2] in renames:
            parts[2] = renames[parts[2]]
        dec_sd[".".join(parts)] = t
    dec = vlm.llm.get_decoder()
    missing, unexpected = dec.load_state_dict(dec_sd, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise Molmo2Incompatible(
            f"reverse mapping of the text model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    head = vlm.llm.get_output_embeddings().weight
    src = sd["lm_head.weight"]  # (vocab_size, H); rows for additional_vocab tokens are absent in Molmo2
    with torch.no_grad():
        head.zero_()
        head[: src.shape[0]].copy_(src)
