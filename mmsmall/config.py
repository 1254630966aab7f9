"""Nested dataclass configs: the single source of truth for a run.

A config is a tree of dataclasses. YAML files under ``configs/`` fill it; a string where a
section is expected names another YAML file (relative to the including file), so a train
config can say ``model: ../model/tiny.yaml``. Dotted overrides from the command line
(``train.lr.connector=2e-4``) are parsed as YAML scalars. Unknown keys and wrong types fail
with the path of the key and the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmsmall.processing.points import POINT_FORMATS
from mmsmall.resources import find_config


class ConfigError(ValueError):
    """A config file or override is wrong; the message says where and what is valid."""


# ----------------------------------------------------------------------------- model


@dataclass
class VisionConfig:
    backend: str = "open_clip"  # open_clip | hf
    name: str = "ViT-L-14-336"  # open_clip model name, or HF hub id / local path (backend=hf)
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint path; None = random init
    custom: dict | None = None  # open_clip model config (open_clip) or HF vision config dict (hf)
    layers: list[int] = field(default_factory=lambda: [-3, -10])  # Molmo: 3rd and 10th from last


@dataclass
class ConnectorConfig:
    pool_heads: int = 0  # attention-pool heads; 0 = the vision tower's head count
    mlp_hidden: int = 0  # SwiGLU hidden width; 0 = the LLM's intermediate size
    pad_embed: bool = False  # learned embeddings for fully/partly padded patches (Molmo 1)


@dataclass
class LLMConfig:
    name: str | None = None  # HF hub id or local path of an AutoModelForCausalLM
    custom: dict | None = None  # HF config dict (with model_type) for random init
    # sdpa_docwise: attention per packed document (mmsmall/model/attention.py); sdpa: one call with
    # a (B, 1, T, T) block mask; eager: the same mask, additive
    attn_implementation: str = "sdpa_docwise"


@dataclass
class TokenizerConfig:
    name: str | None = None  # HF hub id or local path; None = the LLM's, or a tiny trained BPE
    tiny_vocab_size: int = 384  # vocab of the tiny BPE when no tokenizer is given


@dataclass
class ImageConfig:
    crop_size: int = 378
    patch_size: int = 14
    max_crops: int = 8
    max_crops_eval: int = 8
    overlap_margins: list[int] = field(default_factory=lambda: [4, 4])
    pooling_size: list[int] = field(default_factory=lambda: [2, 2])
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    style_prefix: bool = False  # prepend Molmo task-style prefixes ("chart_qa:", ...)
    bidirectional_image: bool = True  # image tokens of one sample attend to each other both ways (Molmo2)
    # Released checkpoints (mmsmall import): ids >= emit_vocab are input-only (stock Molmo2's extra
    # vocabulary) and get logit -inf; 0 = every id can be emitted.
    emit_vocab: int = 0
    # How eval / chat / predict prompt the model: "mmsmall" (` User: ... Assistant:`) or
    # "chat_template" (the tokenizer's own chat template through transformers' Molmo2 processor).
    prompt: str = "mmsmall"
    # The pointing text the model was trained in: "molmo" (<point x="12.3" ...>, percent) or
    # "molmo2" (<points coords="1 1 523 412">, per mille); imported Molmo2 checkpoints speak molmo2.
    point_format: str = "molmo"


# ----------------------------------------------------------------------------- data


@dataclass
class MixtureEntry:
    path: str = ""  # a shard folder (with manifest.json) or a brace pattern of .tar files
    rate: float = 1.0  # sampling rate, normalized over the mixture
    name: str = ""


@dataclass
class DataConfig:
    train: list[MixtureEntry] = field(default_factory=list)
    seq_len: int = 2048  # token budget of one packed sequence
    pack: bool = True
    max_conversations: int = 4  # annotations of one image joined in one sequence
    # image tokens one sample may take (None: no cap); over it the crops per image are lowered
    # together, so a many-page document fits seq_len (counted as lowered_image_crops in the log)
    max_image_tokens: int | None = None
    response_dropout: float = 0.0  # fraction of response tokens dropped from the loss
    num_workers: int = 0
    # Pointing answers are trained in this text: "molmo" | "molmo2" (answers in the shards are
    # rewritten from Molmo's text); "" follows the model: an init_from Molmo2 trains in "molmo2".
    point_format: str = ""


# ----------------------------------------------------------------------------- train


@dataclass
class ModuleFloats:
    connector: float = 0.0
    vision: float = 0.0
    llm: float = 0.0


MODULES = tuple(f.name for f in dataclasses.fields(ModuleFloats))  # the VLM's three trainable parts


_LLM_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAModuleConfig:
    rank: int = 0  # 0 = no adapters: the module stays frozen
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # peft names (suffixes) of the Linear layers


@dataclass
class LoRAConfig:
    """peft LoRA on the LLM (and optionally the ViT); the connector trains fully, the rest is frozen."""

    enabled: bool = False
    llm: LoRAModuleConfig = field(
        default_factory=lambda: LoRAModuleConfig(rank=16, alpha=32.0, target_modules=list(_LLM_PROJ))
    )
    vision: LoRAModuleConfig = field(default_factory=LoRAModuleConfig)
    qlora: bool = False  # 4-bit NF4 LLM base through bitsandbytes (the qlora extra; CUDA, or CPU in tests)


@dataclass
class TrainEvalConfig:
    """Evaluation during training (mmsmall/train/live_eval.py): the eval harness's task metrics."""

    every: int = 0  # evaluate every N optimizer steps and after the last; 0 = never
    tasks: dict = field(default_factory=dict)  # eval task name -> held-out data (shard folder or path)
    limit: int = 0  # the first N samples of each task; 0 = all
    batch_size: int = 8


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 1
    grad_accum: int = 1
    lr: ModuleFloats = field(default_factory=lambda: ModuleFloats(2e-4, 6e-6, 2e-5))
    warmup: ModuleFloats = field(default_factory=lambda: ModuleFloats(200, 2000, 2000))
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-6
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    # how target tokens share the loss (LOSS_WEIGHTINGS): "token" (every target
    # token alike), "sqrt" (a conversation's tokens weighted 1/sqrt(n), InternVL2.5's square
    # averaging: long answers such as point lists no longer drown one-word answers), "conversation"
    loss_weighting: str = "token"
    freeze: list[str] = field(default_factory=list)  # any of connector, vision, llm
    deepspeed: str = "configs/deepspeed/zero2.json"
    precision: str = "bf16"  # bf16 | fp32
    activation_checkpointing: bool = False
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    log_every: int = 1
    tensorboard: bool = True
    wandb: bool = False
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    init_from: str | None = None  # a saved model folder (a previous stage's out_dir/model) to start from
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # peft LoRA (mmsmall/model/lora.py)


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- machinery


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str, base_dir: Path | None) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {getattr(tp, '__name__', tp)})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):  # a section given as another YAML file
            if not value.endswith((".yaml", ".yml")):
                keys = ", ".join(f.name for f in dataclasses.fields(tp))
                raise ConfigError(
                    f"{where}: {value!r} is not a section; give a mapping ({keys}) or a .yaml file"
                )
            path = Path(value)
            if not path.is_absolute() and base_dir is not None and not path.exists():
                path = base_dir / path
            return _from_file(tp, path, where)
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, where, base_dir)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]", base_dir) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


# Keys that were removed, per section: (why and what to use instead, the value it always had in
# effect). A saved config (model folder, checkpoint) that still holds that value loads; any other
# value is refused with the hint, so a user's YAML never silently loses a setting.
def _same_window(pool: Any, model: dict) -> bool:
    image = model.get("image") if isinstance(model.get("image"), dict) else {}
    try:
        return [int(x) for x in str(pool).lower().split("x")] == list(image.get("pooling_size", [2, 2]))
    except ValueError:
        return False


_REMOVED: dict[str, dict[str, tuple[str, Any]]] = {
    "ModelConfig": {
        "connector.pool": (
            "the pooling window is model.image.pooling_size (e.g. [2, 2]); set that instead",
            _same_window,
        ),
    },
    "DataConfig": {"shuffle_buffer": ("it was never read; delete it", lambda v, _: v == 256)},
    "TrainConfig": {
        "debug_kill_at_step": (
            "fault injection is MMSMALL_TEST_KILL_AT_STEP (mmsmall/faults.py)",
            lambda v, _: v == 0,
        ),
        "debug_kill_during_save": (
            "fault injection is MMSMALL_TEST_KILL_DURING_SAVE (mmsmall/faults.py)",
            lambda v, _: v is False,
        ),
    },
}


def removed_key_hint(cls: type, dotted: str) -> str | None:
    """Why ``dotted`` (relative to section ``cls``) no longer exists and what replaces it, or None."""
    entry = _REMOVED.get(cls.__name__, {}).get(dotted)
    return entry[0] if entry else None


def drop_removed(cls: type, data: dict, where: str = "") -> dict:
    """``data`` without the removed keys of section ``cls`` that hold their old value; ConfigError
    naming the replacement for one that holds another."""
    for dotted, (hint, inert) in _REMOVED.get(cls.__name__, {}).items():
        *path, key = dotted.split(".")
        node = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or key not in node:
            continue
        if not inert(node[key], data):
            name = f"{where}.{dotted}" if where else dotted
            raise ConfigError(f"{name}: removed ({hint})")
        data = _without(data, [*path, key])
    return data


def strip_removed(cls: type, data: dict) -> dict:
    """A saved config's raw mapping without the removed keys of every section (see drop_removed)."""
    data = drop_removed(cls, data)
    types_ = _field_types(cls)
    out = {}
    for name, value in data.items():
        tp, _ = _strip_optional(types_.get(name, Any))
        out[name] = (
            strip_removed(tp, value) if dataclasses.is_dataclass(tp) and isinstance(value, dict) else value
        )
    return out


def _without(data: dict, path: list[str]) -> dict:
    head, *rest = path
    if not rest:
        return {k: v for k, v in data.items() if k != head}
    return {**data, head: _without(data[head], rest)}


def from_dict(cls: type, data: dict, where: str = "", base_dir: Path | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, strictly: unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {data!r}")
    data = drop_removed(cls, data, where)
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under {where or 'the top level'}: "
            f"{', '.join(sorted(types_))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, types_[name], f"{where}.{name}" if where else name, base_dir)
    return cls(**kwargs)


def _from_file(cls: type, path: Path, where: str = "") -> Any:
    if not path.exists():
        raise ConfigError(f"{where or 'config'}: file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        return from_dict(cls, data, where, path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{dotted.key: leaf}``."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def to_dict(cfg: Any) -> Any:
    """Plain nested dicts/lists (YAML- and JSON-serializable)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def apply_override(cfg: Any, override: str) -> Any:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as a YAML scalar."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.lr.connector=2e-4")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is not a section")
        types_ = _field_types(type(node))
        hint = removed_key_hint(type(node), ".".join(parts[i:]))
        if hint:
            raise ConfigError(f"override {key}: removed ({hint})")
        if part not in types_:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(
                f"unknown config key {'.'.join(parts[: i + 1])}; valid keys under {where}: "
                f"{', '.join(sorted(types_))}"
            )
        if i == len(parts) - 1:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            setattr(node, part, _coerce(value, types_[part], key, Path.cwd()))
        else:
            node = getattr(node, part)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), cls: type = RunConfig):
    """Load a YAML config (or defaults when ``path`` is None) and apply dotted overrides."""
    cfg = cls() if path is None else _from_file(cls, find_config(path))
    for ov in overrides:
        apply_override(cfg, ov)
    validate(cfg)
    return cfg


PROMPT_FORMATS = ("mmsmall", "chat_template")
# train.loss_weighting -> p: each of a conversation's n target tokens weighs n**-p in the loss
LOSS_WEIGHTINGS = {"token": 0.0, "sqrt": 0.5, "conversation": 1.0}


def validate(cfg: Any) -> None:
    """Cross-field checks that types alone cannot express."""
    if isinstance(cfg, RunConfig):
        validate(cfg.model)
        bad = sorted(set(cfg.train.freeze) - set(MODULES))
        if bad:
            raise ConfigError(f"train.freeze: unknown module {bad[0]!r}; valid: {', '.join(sorted(MODULES))}")
        if cfg.train.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(
                f"train.loss_weighting: {cfg.train.loss_weighting!r}; valid: {', '.join(LOSS_WEIGHTINGS)}"
            )
        if cfg.train.precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision: {cfg.train.precision!r}; valid: bf16, fp32")
        _check_ranges(cfg)
        if not cfg.data.response_dropout < 1:
            raise ConfigError(
                f"data.response_dropout: {cfg.data.response_dropout!r}; valid range [0, 1) (at 1 every "
                "target is dropped and the loss is 0)"
            )
        if cfg.data.point_format not in ("", *POINT_FORMATS):
            raise ConfigError(
                f"data.point_format: {cfg.data.point_format!r}; valid: {', '.join(POINT_FORMATS)} "
                "(or leave it unset to follow the model)"
            )
        ev = cfg.train.eval
        if ev.every < 0 or ev.limit < 0 or ev.batch_size < 1:
            raise ConfigError("train.eval: every and limit must be >= 0 and batch_size >= 1")
        if ev.every and not ev.tasks:
            raise ConfigError(
                "train.eval.every is set but train.eval.tasks is empty; name held-out sets, e.g. "
                "train.eval.tasks='{synth_charts: data/synth/charts_eval}'"
            )
    if isinstance(cfg, ModelConfig):
        if cfg.llm.name is None and cfg.llm.custom is None:
            raise ConfigError("model.llm: give either name (hub id or path) or custom (a config dict)")
        if cfg.prompt not in PROMPT_FORMATS:
            raise ConfigError(f"model.prompt: {cfg.prompt!r}; valid: {', '.join(PROMPT_FORMATS)}")
        if cfg.point_format not in POINT_FORMATS:
            raise ConfigError(f"model.point_format: {cfg.point_format!r}; valid: {', '.join(POINT_FORMATS)}")


# (key, smallest allowed value): counts and sizes a run cannot work with below these.
_MINIMUMS = (
    ("train.steps", 1), ("train.micro_batch_size", 1), ("train.grad_accum", 1), ("train.save_every", 0),
    ("train.keep_last", 1), ("train.log_every", 1), ("train.eps", 0), ("train.weight_decay", 0),
    ("train.clip_grad", 0), ("train.min_lr_ratio", 0), ("data.seq_len", 1), ("data.max_conversations", 1),
    ("data.max_image_tokens", 1), ("data.num_workers", 0), ("data.response_dropout", 0),
    *((f"train.{group}.{m}", 0) for group in ("lr", "warmup") for m in MODULES),
)  # fmt: skip


def _check_ranges(cfg: RunConfig) -> None:
    for key, low in _MINIMUMS:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None and value < low:  # None: an optional cap left off
            raise ConfigError(f"{key}: {value!r} is below the smallest allowed value, {low}")


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (beside every run and checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
