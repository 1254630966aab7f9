"""Our own Hugging Face classes: ``MMSmallConfig``, ``MMSmallForConditionalGeneration``, ``MMSmallProcessor``.

They wrap (compose) the mmsmall :class:`~mmsmall.model.vlm.VLM` and
:class:`~mmsmall.processing.processor.Processor`, so any tower / LLM combination mmsmall trains
can be released and loaded with the Auto classes, once this module is imported::

    import mmsmall.export.hf  # registers model_type "mmsmall"
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(images=image, text="What is shown?")
    out = model.generate(**inputs, max_new_tokens=32)

The config holds our ``ModelConfig`` as a dict plus the LLM (``text_config``) and HF vision
tower (``vision_config``) configs, so a folder rebuilds offline with random init + load.
``from_pretrained`` checks every shard against ``checksums.json`` before transformers reads it.
"""

from __future__ import annotations

import contextvars
import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmsmall.config import ModelConfig, from_dict, to_dict
from mmsmall.errors import MissingInput
from mmsmall.export.load import Source, hf_tokenizer, load_model, plain_config
from mmsmall.model.vlm import IMAGE_TOKENS, VLM, next_token_loss, offline_config, positions_from_mask
from mmsmall.processing.batch import count_targets

MODEL_TYPE = "mmsmall"

# The folder ``from_pretrained`` is reading, so that __init__ takes the tokenizer saved there.
_LOADING_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmsmall_loading_dir", default=None)


class MMSmallConfig(PretrainedConfig):
    """``model_config``: our ModelConfig as a dict; ``text_config`` / ``vision_config``: the LLM's and
    the HF vision tower's configs (None for open_clip towers, whose dict stays in model_config);
    ``image_token_ids``: token string -> id of the image special tokens."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        model_config: dict | None = None,
        text_config: dict | PretrainedConfig | None = None,
        vision_config: dict | PretrainedConfig | None = None,
        image_token_ids: dict[str, int] | None = None,
        **kwargs: Any,
    ):
        self.model_config = model_config or {}
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        if isinstance(vision_config, dict):
            vision_config = AutoConfig.for_model(**vision_config)
        self.text_config = text_config
        self.vision_config = vision_config
        self.image_token_ids = image_token_ids or {}
        super().__init__(**kwargs)

    @classmethod
    def from_vlm(cls, vlm: VLM) -> MMSmallConfig:
        tok = vlm.tokenizer
        vision_config = None
        if vlm.cfg.vision.backend == "hf":
            vision_config = vlm.vision.backbone.model.config.to_dict()
        return cls(
            model_config=to_dict(vlm.cfg),
            text_config=vlm.llm.config.to_dict(),
            vision_config=vision_config,
            image_token_ids={t: tok.convert_tokens_to_ids(t) for t in IMAGE_TOKENS},
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )

    def build_model_config(self) -> ModelConfig:
        """Our ModelConfig with hub references replaced by the stored configs (offline rebuild)."""
        return offline_config(self.saved_model_config(), *self.stored_configs())

    def saved_model_config(self) -> ModelConfig:
        """Our ModelConfig as saved (with its hub names)."""
        return from_dict(ModelConfig, dict(self.model_config), "config.json:model_config")

    def stored_configs(self) -> tuple[dict, dict | None]:
        """The (llm, vision) config dicts this config.json holds, for a build without downloads."""
        vision = plain_config(self.vision_config.to_dict()) if self.vision_config is not None else None
        return plain_config(self.text_config.to_dict()), vision


def _tokenizer_for(config: MMSmallConfig):
    """The tokenizer saved in the folder ``from_pretrained`` reads, else the one config.json names."""
    return hf_tokenizer(config.model_config, config.image_token_ids, _LOADING_DIR.get())


class MMSmallPreTrainedModel(PreTrainedModel):
    config_class = MMSmallConfig
    config: MMSmallConfig
    base_model_prefix = "vlm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules: list[str] = []

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Parameters come from the wrapped VLM (``from_vlm``) or the checkpoint (``from_pretrained``,
        # which fails on missing keys), never from transformers' initializers: ``post_init`` must not
        # re-randomize a trained model. Only our non-persistent buffers need values again after
        # transformers builds the model on the meta device.
        if isinstance(module, VLM):
            vocab = module.tokenizer.get_vocab()
            ids = torch.tensor([vocab[t] for t in IMAGE_TOKENS], device=module.image_token_ids.device)
            module.image_token_ids.copy_(ids)


class MMSmallForConditionalGeneration(MMSmallPreTrainedModel, GenerationMixin):
    """A PreTrainedModel + GenerationMixin around our VLM (``self.vlm``)."""

    def __init__(self, config: MMSmallConfig, vlm: VLM | None = None):
        super().__init__(config)
        if vlm is None:
            model_cfg = config.saved_model_config()
            # transformers builds models on the meta device; open_clip moves its model with .to(),
            # which meta tensors cannot do, so an open_clip VLM is built on the CPU (then loaded).
            device = "cpu" if model_cfg.vision.backend == "open_clip" else torch.get_default_device()
            with torch.device(device):
                source = Source(
                    "config", cfg=model_cfg, tokenizer=_tokenizer_for(config), configs=config.stored_configs()
                )
                vlm = load_model(source, weights=False)
        self.vlm = vlm
        self.post_init()

    @classmethod
    def from_vlm(cls, vlm: VLM) -> MMSmallForConditionalGeneration:
        """Wrap a trained VLM (weights shared, not copied)."""
        return cls(MMSmallConfig.from_vlm(vlm), vlm=vlm)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """transformers' from_pretrained, after checking every shard against ``checksums.json``.

        Models with an open_clip tower are built on the CPU and loaded with a strict
        ``load_state_dict`` instead: open_clip cannot be built on the meta device that
        transformers uses, and transformers would then reset the non-persistent buffers
        (rotary tables) of a model that was not.
        """
        from mmsmall.export.safetensors_io import load_sharded, verify_shards

        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():  # a hub id: fetch the whole folder (cache / HF_HUB_OFFLINE respected)
            from huggingface_hub import snapshot_download

            try:
                path = Path(
                    snapshot_download(str(pretrained_model_name_or_path), revision=kwargs.get("revision"))
                )
            except Exception as e:
                raise MissingInput(
                    f"{pretrained_model_name_or_path}: not a local folder, and fetching it from the hub failed ({e})"
                ) from e
        verify_shards(path)
        config = kwargs.pop("config", None)
        if not isinstance(config, MMSmallConfig):
            config = MMSmallConfig.from_pretrained(str(path))
        token = _LOADING_DIR.set(str(path))
        try:
            if config.model_config.get("vision", {}).get("backend") != "open_clip":
                kwargs["use_safetensors"] = True
                return super().from_pretrained(str(path), *args, config=config, **kwargs)
            model = cls(config)
        finally:
            _LOADING_DIR.reset(token)
        state = load_sharded(path, verify=False)  # verified above
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        if (path / "generation_config.json").exists():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(str(path))
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        return model.eval()

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """transformers' save_pretrained (safetensors, 5 GB shards) + tokenizer + ``checksums.json``."""
        from mmsmall.export.safetensors_io import shard_files, umask_mode, write_checksums

        kwargs.setdefault("max_shard_size", "5GB")
        super().save_pretrained(save_directory, *args, **kwargs)
        umask_mode(*shard_files(save_directory))  # transformers writes them 0600
        self.vlm.tokenizer.save_pretrained(save_directory)
        write_checksums(save_directory)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.vlm.llm.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.vlm.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.vlm.llm.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        pixel_values: torch.Tensor | None = None,
        image_token_pooling: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        image_num_crops: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        conv_ids: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Prefill (no cache yet): image features + the Batch attention rule (bidirectional image
        block, packed docs, conversations). Decode steps: plain causal over the 2D attention_mask.

        input_ids (B, T); attention_mask (B, T_past + T); pixel_values (N, P, C);
        image_token_pooling (M, K). image_grids / image_num_crops are accepted (processor output) and unused.
        """
        if input_ids is None:
            raise ValueError(
                "MMSmallForConditionalGeneration needs input_ids (inputs_embeds is not supported)"
            )
        vlm = self.vlm
        b, t = input_ids.shape
        past = 0 if cache is None else cache.get_seq_length()
        if past == 0:
            out, _ = vlm.prefill(
                input_ids, attention_mask, position_ids, doc_ids, conv_ids, pixel_values, image_token_pooling,
                cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep,
            )  # fmt: skip
        else:
            device = input_ids.device
            keys = (
                torch.ones(b, past + t, dtype=torch.bool, device=device)
                if attention_mask is None
                else attention_mask.bool()
            )  # (B, T_past + T)
            if position_ids is None:  # the new tokens' positions among all real ones so far
                position_ids = positions_from_mask(attention_mask, b, past + t, device)[:, -t:]  # (B, T)
            out = vlm.decode(
                input_ids, keys, position_ids, cache, use_cache=use_cache, logits_to_keep=logits_to_keep
            )
        loss = None
        logits = vlm.emittable(out.logits)  # (B, T, V); input-only ids at -inf
        if labels is not None:
            loss = next_token_loss(logits[:, :-1], labels[:, 1:], count_targets(labels), "mean")
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, is_first_iteration: bool = False, **kwargs
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, is_first_iteration=is_first_iteration, **kwargs
        )
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("pixel_values", "image_token_pooling", "doc_ids", "conv_ids"):
                model_inputs[key] = None  # images were merged at prefill; the cache holds them
        return model_inputs


class MMSmallProcessor(ProcessorMixin):
    """Our :class:`~mmsmall.processing.processor.Processor` behind the ProcessorMixin API.

    ``processor(images=img, text="question")`` (or lists of both) returns a left-padded batch ready
    for ``generate``; ``text`` is the user question, formatted as `` User: {q} Assistant:`` with the
    image tokens in front. ``apply_chat_template`` works on the same Molmo format.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        chat_template: str | None = None,
        image_config: dict | None = None,
        style_prefix: bool = False,
        **kwargs: Any,
    ):
        self.image_config = dict(image_config or {})
        self.style_prefix = style_prefix
        super().__init__(tokenizer, chat_template=chat_template, **kwargs)
        self._processor = None

    @property
    def processor(self):
        """The wrapped mmsmall Processor (built on first use)."""
        if self._processor is None:
            from mmsmall.config import ImageConfig
            from mmsmall.processing.processor import Processor

            image_cfg = from_dict(ImageConfig, self.image_config, "processor_config.json:image_config")
            self._processor = Processor(self.tokenizer, image_cfg, style_prefix=self.style_prefix)
        return self._processor

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        task: str | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> dict[str, Any]:
        from mmsmall.processing.processor import collate

        texts = [text] if isinstance(text, str) or text is None else list(text)
        imgs = images if isinstance(images, (list, tuple)) else [images] * len(texts)
        if len(imgs) != len(texts):
            raise ValueError(
                f"got {len(imgs)} images for {len(texts)} texts; give one image (or None) per text"
            )
        examples = [self.processor.encode_prompt(im, q or "", task=task) for im, q in zip(imgs, texts)]
        batch = collate(examples, pad_id=self.tokenizer.pad_token_id, left_pad=True)
        # A one-conversation prompt needs no doc / conversation ids: the attention_mask says it all.
        keys = ("input_ids", "attention_mask", "pixel_values", "image_token_pooling", "image_grids")
        return {k: batch[k] for k in keys if batch.get(k) is not None}

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Messages in the transformers layout (``content`` a string or a list of ``{"type": "image" |
        "text"}`` parts) -> the prompt text (``tokenize=False``) or a generate-ready batch, encoded
        by our Processor (one image per conversation, the last turn a user turn)."""
        if not tokenize:
            return super().apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
            )
        from PIL import Image

        from mmsmall.processing.images import to_rgb_image
        from mmsmall.processing.processor import collate

        convs = [conversation] if conversation and isinstance(conversation[0], dict) else conversation
        examples = []
        for conv in convs:
            image, turns = None, []
            for msg in conv:
                parts = (
                    msg["content"]
                    if isinstance(msg["content"], list)
                    else [{"type": "text", "text": msg["content"]}]
                )
                for part in parts:
                    if part.get("type") == "image":
                        found = part.get("image", part.get("path", part.get("url")))
                        image = to_rgb_image(Image.open(found)) if isinstance(found, (str, Path)) else found
                text = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
                turns.append({"role": msg["role"], "content": text})
            examples.append(self.processor.encode(image, [turns], train=False))
        batch = collate(examples, pad_id=self.tokenizer.pad_token_id, left_pad=True)
        keys = ("input_ids", "attention_mask", "pixel_values", "image_token_pooling", "image_grids")
        out = {k: batch[k] for k in keys if batch.get(k) is not None}
        return out if return_dict else out["input_ids"]

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


def register() -> None:
    """Register the classes with the Auto factories (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, MMSmallConfig)
    except ValueError:
        return  # already registered
    AutoModelForImageTextToText.register(MMSmallConfig, MMSmallForConditionalGeneration)
    AutoProcessor.register(MMSmallConfig, MMSmallProcessor)


register()


def processor_for(vlm: VLM, chat_template: str | None = None) -> MMSmallProcessor:
    """An MMSmallProcessor with the VLM's tokenizer and image settings."""
    return MMSmallProcessor(
        vlm.tokenizer,
        chat_template=chat_template,
        image_config=json.loads(json.dumps(to_dict(vlm.cfg.image))),
        style_prefix=vlm.cfg.style_prefix,
    )
