"""``mmsmall plan CONFIG [k=v ...] --gpus N --gpu-mem GiB [--nodes K]``: will the run fit?

Per-GPU memory of a training run, from the configs alone (the model is built on the ``meta``
device: shapes, no weights, no download; see :func:`architecture` for where the widths and the
vocabulary come from). Exit codes of the CLI: 0 fits, 1 does not fit, 2 could not plan.

- model states per ZeRO stage and offload, with DeepSpeed's own accounting for bf16 mixed
  precision (2-byte parameters and gradients, fp32 gradients, master weights, momentum and
  variance: 2 + 18 bytes per trainable parameter, as ``estimate_zero2/3_model_states_mem_needs``;
  ZeRO-3 adds one gathered layer, 4 bytes per parameter of the largest module). An fp32 run keeps
  4 + 4 + 8 bytes (no separate master copy). Frozen modules hold only their parameters;
  with ``train.lora`` what trains is what ``engine.set_trainable`` leaves trainable (the peft
  adapters and the connector), and with ``qlora`` the LLM's 4-bit layers count ``nf4_bytes``;
- activations of one micro-batch (``micro_batch_size`` rows of ``seq_len`` tokens): the tensors
  each LLM decoder layer and each ViT block keeps for backward, per token (see
  ``_llm_layer_elements`` / ``_vit_block_elements``), the 4D attention mask unless the docwise
  kernel is used, and the crops of one ``max_crops``-image per row (plus its low-resolution
  overview); with ``train.activation_checkpointing`` each layer keeps only its input and one
  layer's activations are alive again during its recompute; LoRA adds each adapter's dropped-out
  input and rank-wide output; a tower that nothing trains through keeps no activations;
- the largest ``micro_batch_size`` that fits, and a message naming what to change when the run
  does not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmsmall.model.attention import DOCWISE
from mmsmall.model.lora import LORA_ZERO3
from mmsmall.resources import CONFIGS_DIR
from mmsmall.train.engine import read_ds_json

GIB = 1024**3


@dataclass
class ModelShape:
    """Parameter counts and the widths activations depend on."""

    params: dict[str, int]  # per module (vision, connector, llm)
    trainable: int
    largest_layer: int  # parameters of the largest single module (ZeRO-3 gathers one at a time)
    llm_hidden: int
    llm_intermediate: int
    llm_layers: int
    llm_kv_dim: int
    vit_width: int
    vit_mlp: int
    vit_blocks: int  # blocks that run (the tower is pruned after the deepest used layer)
    vit_tokens: int  # tokens per crop (patches plus any prefix token)
    vit_heads: int
    llm_heads: int
    vocab: int
    quantized: int = 0  # parameters stored in 4 bits (QLoRA's base)
    quantized_bytes: int = 0  # their bytes with the quantization statistics
    vision_trains: bool = True  # False: no gradient flows into the tower, it keeps no activations
    vit_features: int = 2  # tower layers the connector reads
    lora: dict = field(default_factory=dict)  # "llm" / "vision": (elements, mask bytes) per token per layer
    source: str = "model"  # where the architecture came from

    @property
    def total(self) -> int:
        return sum(self.params.values())


@dataclass
class MemoryPlan:
    gpus: int
    nodes: int
    gpu_mem: float  # bytes per GPU
    stage: int
    offload_optimizer: bool
    offload_param: bool
    precision: str
    checkpointing: bool
    micro_batch_size: int
    shape: ModelShape
    states: dict[str, float] = field(default_factory=dict)  # params / grads / optimizer, bytes per GPU
    activations: dict[str, float] = field(default_factory=dict)  # llm / vision / mask, one micro-batch
    activations_other: float = 0.0  # the same micro-batch with checkpointing the other way round
    cpu_per_node: float = 0.0  # offloaded states, bytes per node
    max_micro_batch: int = 0

    @property
    def total(self) -> float:
        return sum(self.states.values()) + sum(self.activations.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem


class PlanError(ValueError):
    """The run could not be planned (``mmsmall plan`` exit 2): one line saying what and what to do."""


FACTS = CONFIGS_DIR / "architectures" / "hub.yaml"


def _hub_facts(name: str) -> dict | None:
    """The shipped architecture facts of hub model ``name`` (``configs/architectures/hub.yaml``)."""
    import yaml

    return (yaml.safe_load(FACTS.read_text()) or {}).get(name)


def _named_config(name: str, key: str, vision: bool = False) -> dict:
    """The config dict of ``name`` (at config key ``key``): a local folder's, else the shipped
    facts', else ``AutoConfig``'s (a hub config only; from the cache or the network)."""
    from transformers import AutoConfig

    facts = None if Path(name).is_dir() else _hub_facts(name)
    if facts is not None:
        return dict(facts["config"])
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        raise PlanError(
            f"{key}={name!r}: no architecture facts offline (not a local folder, not in {FACTS}, no "
            f"cached hub config); give a local model folder or add {name!r} to that file"
        ) from None
    if vision:
        config = getattr(config, "vision_config", config)
        return {"model_type": config.model_type, **config.to_diff_dict()}
    return config.get_text_config().to_dict()


def _tokenizer_len(cfg: Any, llm_name: str | None) -> int:
    """``len`` of the run's tokenizer with the image tokens, without loading a hub tokenizer: the
    tiny BPE or a local folder's tokenizer is built; a hub name's length is its shipped fact (an
    upper bound: some image tokens may exist already); 0 when unknown (the config's vocab_size)."""
    from mmsmall.config import TokenizerConfig
    from mmsmall.processing.tokenizer import IMAGE_SPECIAL_TOKENS, build_tokenizer

    name = cfg.name or llm_name
    if name is None or Path(name).is_dir():
        return len(build_tokenizer(TokenizerConfig(name=name, tiny_vocab_size=cfg.tiny_vocab_size)))
    facts = _hub_facts(name)
    return facts["tokenizer_len"] + len(IMAGE_SPECIAL_TOKENS) if facts else 0


def architecture(run_cfg: Any) -> tuple[Any, int, str]:
    """(model config whose every part is a ``custom`` dict, so that it builds with no download;
    tokenizer length; where it came from).

    With ``train.init_from`` the folder's model is trained, so it is planned when it is there;
    before that stage has run, the config's own model is (a later stage keeps the architecture).
    """
    from mmsmall.config import ModelConfig, load_config
    from mmsmall.model.vlm import folder_configs, offline_config

    mcfg = run_cfg.model
    folder = Path(run_cfg.train.init_from) if run_cfg.train.init_from else None
    source = "model (the config's)"
    if folder is not None and folder.is_dir():
        if not (folder / "model_config.yaml").exists():
            raise PlanError(
                f"train.init_from: {folder} has no model_config.yaml (a stock Molmo2 folder?); plan the "
                "folder `mmsmall import` writes from it"
            )
        saved = load_config(folder / "model_config.yaml", cls=ModelConfig)
        return offline_config(saved, *folder_configs(folder)), 0, f"train.init_from {folder}"
    if folder is not None:
        source = f"model (train.init_from {folder} is not there yet)"
    llm = None if mcfg.llm.custom is not None else _named_config(mcfg.llm.name, "model.llm.name")
    vision = None
    if mcfg.vision.backend == "hf" and mcfg.vision.custom is None:  # config only, never the weights
        vision = _named_config(mcfg.vision.name, "model.vision.name", vision=True)
    return offline_config(mcfg, llm, vision), _tokenizer_len(mcfg.tokenizer, mcfg.llm.name), source


def model_shape(run_cfg: Any) -> ModelShape:
    """Build the VLM of ``run_cfg`` on the meta device, set what trains as training does
    (``engine.set_trainable``: freeze, LoRA adapters), and read its counts and widths.

    QLoRA's 4-bit base is counted, not built (bitsandbytes quantizes real weights): the adapters
    go on the plain layers, whose shapes are the same, and the layers ``quantize_base`` swaps are
    counted at ``nf4_bytes``.
    """
    from mmsmall.config import TokenizerConfig
    from mmsmall.export.load import Source, load_model
    from mmsmall.model.lora import _lora_layers, four_bit_targets, nf4_bytes
    from mmsmall.processing.tokenizer import build_tokenizer
    from mmsmall.train.engine import set_trainable

    mcfg, tokenizer_len, source = architecture(run_cfg)
    tiny = build_tokenizer(TokenizerConfig(name=None))  # its ids only: the vocabulary is counted above
    custom = dict(mcfg.llm.custom)
    custom["vocab_size"] = max(int(custom.get("vocab_size") or 0), tokenizer_len)
    mcfg = replace(mcfg, llm=replace(mcfg.llm, custom=custom))
    t = run_cfg.train
    with torch.device("meta"):
        model = load_model(Source("config", cfg=mcfg, tokenizer=tiny), weights=False)
        quantized = four_bit_targets(model.llm) if t.lora.enabled and t.lora.qlora else []
        set_trainable(model, replace(t, lora=replace(t.lora, qlora=False)))
    params = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("vision", "connector", "llm")
    }
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = model.llm.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    vt = model.vision
    grid = vt.grid
    prefix = _vision_prefix_tokens(vt)
    return ModelShape(
        params=params,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        largest_layer=largest,
        llm_hidden=text.hidden_size,
        llm_intermediate=text.intermediate_size,
        llm_layers=text.num_hidden_layers,
        llm_kv_dim=kv_heads * head_dim,
        vit_width=vt.hidden_size,
        vit_mlp=_vit_mlp(vt),
        vit_blocks=vt.num_blocks,
        vit_tokens=grid * grid + prefix,
        vit_heads=vt.num_heads,
        llm_heads=heads,
        vocab=model.llm.get_output_embeddings().weight.shape[0],
        quantized=sum(m.weight.numel() for _, m in quantized),
        quantized_bytes=sum(nf4_bytes(m.weight.numel()) for _, m in quantized),
        vision_trains=any(p.requires_grad for p in vt.parameters()),
        vit_features=len(mcfg.vision.layers),
        lora=_lora_per_token(_lora_layers(model), text.num_hidden_layers, vt.num_blocks),
        source=source,
    )


def _lora_per_token(layers: list, llm_layers: int, vit_blocks: int) -> dict[str, tuple[float, float]]:
    """(elements, mask bytes) the adapters keep per token of one LLM layer / ViT block: the
    dropped-out input of ``lora_A`` (and dropout's bool mask) when dropout is on, and ``lora_A``'s
    rank-wide output, from the injected peft layers."""
    out = {"llm": [0.0, 0.0], "vision": [0.0, 0.0]}
    for name, m in layers:
        where = name.split(".", 1)[0]
        dropout = getattr(m.lora_dropout["default"], "p", 0.0) > 0
        out[where][0] += m.r["default"] + (m.in_features if dropout else 0)
        out[where][1] += m.in_features if dropout else 0
    per = {"llm": max(llm_layers, 1), "vision": max(vit_blocks, 1)}
    return {k: (e / per[k], b / per[k]) for k, (e, b) in out.items()}


def _vision_prefix_tokens(tower: nn.Module) -> int:
    visual = getattr(tower.backbone, "visual", None)
    if visual is not None:  # open_clip: a class token unless the config pools without one
        return int(
            getattr(
                visual, "num_prefix_tokens", 1 if getattr(visual, "class_embedding", None) is not None else 0
            )
        )
    return 0 if tower.backbone.model.config.model_type == "siglip_vision_model" else 1


def _vit_mlp(tower: nn.Module) -> int:
    widths = [
        m.out_features
        for name, m in tower.named_modules()
        if name.endswith(("c_fc", "fc1")) and isinstance(m, nn.Linear)
    ]
    return max(widths) if widths else 4 * tower.hidden_size


def _llm_layer_elements(s: ModelShape) -> int:
    """Elements one decoder layer keeps per token for backward: each RMSNorm's input, normalized
    and scaled outputs (2 x 3h), q/k/v (h + 2kv) and their rotary halves (h + kv), the regrouped
    q/k/v/output of the attention kernel (2h + 2kv), the attention output (h), the MLP's gate,
    up, activation and product (4i)."""
    h, kv, i = s.llm_hidden, s.llm_kv_dim, s.llm_intermediate
    return 11 * h + 5 * kv + 4 * i


def _vit_block_elements(s: ModelShape) -> int:
    """Per token of a ViT block: both norms' inputs and outputs (4D), qkv (3D), attention
    output (D), fc1 output and activation (2m)."""
    return 8 * s.vit_width + 2 * s.vit_mlp


def activation_bytes(
    run_cfg: Any, s: ModelShape, micro_batch: int, checkpointing: bool, scores_saved: bool = False
) -> dict[str, float]:
    """Bytes of one micro-batch's saved activations: llm, vision, the attention mask and the
    fp32 logits of the text (target) positions.

    ``scores_saved``: the attention kernel keeps its (heads, T, T) probabilities for backward
    (torch's math kernel, which a CPU uses for the ViT and a masked LLM); GPU flash and
    memory-efficient kernels do not.
    Assumed layout: each row is one ``max_crops`` image (and its overview) and text up to
    ``seq_len``; every text token is a target (the upper bound).
    """
    nbytes = 2 if run_cfg.train.precision == "bf16" else 4
    t_row = run_cfg.data.seq_len
    tokens = micro_batch * t_row
    image = run_cfg.model.image
    crops = micro_batch * (image.max_crops + 1)  # one image per row, its crops and the overview
    grid = image.crop_size // image.patch_size
    per_crop = (grid // image.pooling_size[0]) * (grid // image.pooling_size[1])
    text = max(0, tokens - crops * per_crop)
    vit_tokens = crops * s.vit_tokens
    docwise = run_cfg.model.llm.attn_implementation == DOCWISE
    # docwise attention passes no mask, so even a CPU takes a kernel that keeps no probabilities
    lora_llm, lora_vit = s.lora.get("llm", (0, 0)), s.lora.get("vision", (0, 0))
    llm_layer = _llm_layer_elements(s) + (s.llm_heads * t_row if scores_saved and not docwise else 0)
    llm_layer += lora_llm[0] + lora_llm[1] / nbytes  # the adapters' inputs and outputs, dropout masks
    vit_block = _vit_block_elements(s) + (s.vit_heads * s.vit_tokens if scores_saved else 0)
    vit_block += lora_vit[0] + lora_vit[1] / nbytes
    if checkpointing:  # each layer's input, plus one layer recomputed in backward
        llm = tokens * (s.llm_layers * s.llm_hidden + llm_layer)
        vit = vit_tokens * (s.vit_blocks * s.vit_width + vit_block)
    else:
        llm = tokens * s.llm_layers * llm_layer
        vit = vit_tokens * s.vit_blocks * vit_block
    if not s.vision_trains:  # nothing kept for backward: one block alive, the features read out
        vit = vit_tokens * (s.vit_features * s.vit_width + vit_block)
    llm += tokens * 2 * s.llm_hidden  # the embeddings with image features added, the final norm
    mask = 0 if docwise else micro_batch * t_row**2  # (B, 1, T, T) bool
    logits = text * s.vocab * 4 * 2  # fp32 logits and their log-softmax at target positions
    return {"llm": llm * nbytes, "vision": vit * nbytes, "mask": float(mask), "logits": float(logits)}


def model_state_bytes(
    s: ModelShape, stage: int, world: int, bf16: bool, offload_optimizer: bool, offload_param: bool
) -> tuple[dict[str, float], float]:
    """(params / grads / optimizer bytes per GPU, offloaded bytes per GPU kept in CPU memory).

    bf16 follows DeepSpeed's estimates: ZeRO-2 keeps the 16-bit parameters whole and shards 18
    bytes per parameter (16-bit and fp32 gradients 6, master weights and Adam moments 12); ZeRO-3
    shards the parameters too (2 + 4 + 12) and holds one gathered layer (4 bytes per parameter of
    the largest module). Offloading the optimizer moves gradients and optimizer states to the
    CPU; offloading parameters (ZeRO-3) moves the shards too. fp32: 4-byte parameters and
    gradients, 8 bytes of moments (the parameters are the master weights).
    """
    p_bytes, g_bytes, o_bytes = (2, 6 if stage < 3 else 4, 12) if bf16 else (4, 4, 8)
    sharded = lambda n, from_stage: n / world if stage >= from_stage else n  # noqa: E731
    gathered = 4 * s.largest_layer if stage >= 3 else 0
    params = sharded((s.total - s.quantized) * p_bytes + s.quantized_bytes, 3) + gathered
    grads = sharded(s.trainable * g_bytes, 2)
    optim = sharded(s.trainable * o_bytes, 1)
    cpu = 0.0
    if offload_optimizer:
        cpu += grads + optim
        grads = optim = 0.0
    if offload_param and stage >= 3:
        cpu += params - gathered
        params = gathered
    return {"params": params, "grads": grads, "optimizer": optim}, cpu


def plan(
    run_cfg: Any,
    gpus: int,
    gpu_mem_gib: float,
    nodes: int = 1,
    shape: ModelShape | None = None,
    scores_saved: bool = False,
) -> MemoryPlan:
    """The memory plan of ``run_cfg`` on ``nodes`` x ``gpus`` GPUs of ``gpu_mem_gib`` GiB each
    (``scores_saved``: see ``activation_bytes``; True for a CPU run)."""
    if gpus < 1 or nodes < 1 or not (math.isfinite(gpu_mem_gib) and gpu_mem_gib > 0):
        raise PlanError(
            f"--gpus {gpus} --nodes {nodes} --gpu-mem {gpu_mem_gib}: give positive numbers "
            "(whole GPUs and nodes, GiB of one GPU, e.g. --gpu-mem 80)"
        )
    _, ds = read_ds_json(run_cfg.train)
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if run_cfg.train.lora.enabled and stage >= 3:
        raise PlanError(f"train.lora with ZeRO-3 ({run_cfg.train.deepspeed}): {LORA_ZERO3}")
    s = shape or model_shape(run_cfg)
    off_opt = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    off_param = (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    t = run_cfg.train
    world = gpus * nodes
    states, cpu = model_state_bytes(s, stage, world, t.precision == "bf16", off_opt, off_param)
    p = MemoryPlan(
        gpus=gpus,
        nodes=nodes,
        gpu_mem=gpu_mem_gib * GIB,
        stage=stage,
        offload_optimizer=off_opt,
        offload_param=off_param,
        precision=t.precision,
        checkpointing=t.activation_checkpointing,
        micro_batch_size=t.micro_batch_size,
        shape=s,
        states=states,
        activations=activation_bytes(
            run_cfg, s, t.micro_batch_size, t.activation_checkpointing, scores_saved
        ),
        cpu_per_node=cpu * gpus,
    )
    p.activations_other = sum(
        activation_bytes(
            run_cfg, s, t.micro_batch_size, not t.activation_checkpointing, scores_saved
        ).values()
    )
    free = p.gpu_mem - sum(states.values())
    per_row = sum(activation_bytes(run_cfg, s, 1, t.activation_checkpointing, scores_saved).values())
    p.max_micro_batch = max(0, int(free // per_row)) if free > 0 else 0
    return p


def advice(p: MemoryPlan) -> str:
    """What to change so that the run fits (empty when it does)."""
    if p.fits:
        return ""
    states = sum(p.states.values())
    tips = []
    if states > p.gpu_mem:
        if p.stage < 3:
            tips.append("train.deepspeed=configs/deepspeed/zero3.json (shards parameters too)")
        elif not p.offload_optimizer:
            tips.append("train.deepspeed=configs/deepspeed/zero3_offload.json (states in CPU memory)")
        tips.append(f"more GPUs (--gpus / --nodes; now {p.gpus * p.nodes})")
    else:
        if not p.checkpointing:
            tips.append(f"train.activation_checkpointing=true (activations {_gib(p.activations_other)})")
        if p.max_micro_batch >= 1:
            tips.append(
                f"train.micro_batch_size={p.max_micro_batch} (raise train.grad_accum to keep the batch)"
            )
        else:
            tips.append("a shorter data.seq_len or fewer model.image.max_crops")
        if p.stage < 3:
            tips.append("train.deepspeed=configs/deepspeed/zero3.json (leaves more room for activations)")
    return f"does not fit: {_gib(p.total)} per GPU > {_gib(p.gpu_mem)}; change " + "; or ".join(tips)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


def report(p: MemoryPlan) -> str:
    """The human-readable plan (what ``mmsmall plan`` prints)."""
    s = p.shape
    offload = "+".join(x for x, on in (("optimizer", p.offload_optimizer), ("params", p.offload_param)) if on)
    lines = [
        f"model: {s.total:,} parameters ({s.trainable:,} trainable; "
        + ", ".join(f"{k} {v:,}" for k, v in s.params.items())
        + ")",
        f"architecture from: {s.source}",
        *(
            [f"4-bit base (QLoRA): {s.quantized:,} parameters in {_gib(s.quantized_bytes)}"]
            if s.quantized
            else []
        ),
        f"run: {p.nodes} node(s) x {p.gpus} GPU(s), ZeRO-{p.stage}{' offload ' + offload if offload else ''}, "
        f"{p.precision}, micro-batch {p.micro_batch_size}, checkpointing {'on' if p.checkpointing else 'off'}",
        "per GPU:",
        *(f"  {k:<22} {_gib(v):>12}" for k, v in p.states.items()),
        *(f"  activations {k:<10} {_gib(v):>12}" for k, v in p.activations.items()),
        f"  {'total':<22} {_gib(p.total):>12}   of {_gib(p.gpu_mem)}",
        f"activations with checkpointing {'off' if p.checkpointing else 'on'}: {_gib(p.activations_other)}",
    ]
    if p.cpu_per_node:
        lines.append(f"CPU memory per node for offloaded states: {_gib(p.cpu_per_node)}")
    lines.append(f"largest micro-batch that fits: {p.max_micro_batch}")
    lines.append(advice(p) or "fits")
    return "\n".join(lines)


def as_dict(p: MemoryPlan) -> dict[str, Any]:
    return json.loads(
        json.dumps(
            {
                "states": p.states,
                "activations": p.activations,
                "total": p.total,
                "fits": p.fits,
                "max_micro_batch": p.max_micro_batch,
                "params": p.shape.params,
            }
        )
    )
