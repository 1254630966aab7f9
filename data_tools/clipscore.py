"""CLIP image-text similarity with open_clip: any model name and pretrained tag the user gives.

A random-init model (``pretrained: null``) is seeded so every worker builds the same weights; a
``custom`` config dict is registered with ``open_clip.add_model_config`` under the model's name.
The score of a sample is the cosine similarity of its image with its assistant text (for VQA,
question and answer joined).
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

from PIL import Image

from .config import ClipConfig

# A tiny CLIP for tests and quick demos (random init; the CLIP BPE tokenizer ships in open_clip).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _register(name: str, custom: dict) -> None:
    import open_clip

    # open_clip reads the file into its registry at once, so the folder goes right after (no /tmp litter)
    with tempfile.TemporaryDirectory(prefix="mmsmall_clip_cfg_") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(custom))
        open_clip.add_model_config(path)


@lru_cache(maxsize=2)
def _load(model: str, pretrained: str | None, custom_json: str | None, device: str, seed: int):
    import open_clip
    import torch

    if custom_json is not None:
        _register(model, json.loads(custom_json))
    torch.manual_seed(seed)
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    net.eval()
    return net, preprocess, open_clip.get_tokenizer(model)


def clip_text(messages: list[dict], task: str) -> str:
    answers = [m["content"] for m in messages if m.get("role") == "assistant"]
    if task == "caption":
        return " ".join(answers)
    return " ".join(m["content"] for m in messages)


class ClipScorer:
    """Scores (image, text) pairs in batches; build once per process."""

    def __init__(self, cfg: ClipConfig, seed: int = 0):
        custom = json.dumps(cfg.custom, sort_keys=True) if cfg.custom else None
        self.model, self.preprocess, self.tokenizer = _load(
            cfg.model, cfg.pretrained, custom, cfg.device, seed
        )
        self.device = cfg.device
        self.batch_size = cfg.batch_size
        self.bf16 = cfg.bf16 and str(cfg.device).startswith("cuda")
        if cfg.threads > 0:
            import torch

            torch.set_num_threads(cfg.threads)

    def score(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        """Cosine similarity per pair, rounded to 5 decimals (stable across runs)."""
        import torch

        out: list[float] = []
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16)
        with torch.inference_mode(), autocast:
            for s in range(0, len(images), self.batch_size):
                px = torch.stack([self.preprocess(im) for im in images[s : s + self.batch_size]]).to(
                    self.device
                )
                tok = self.tokenizer(texts[s : s + self.batch_size]).to(self.device)  # (B, 77)
                img = torch.nn.functional.normalize(self.model.encode_image(px).float(), dim=-1)  # (B, E)
                txt = torch.nn.functional.normalize(_encode_text(self.model, tok).float(), dim=-1)  # (B, E)
                out.extend(round(float(v), 5) for v in (img * txt).sum(-1))
        return out


def _encode_text(net, tok):
    """open_clip's ``CLIP.encode_text`` run on the batch's tokens up to its longest text only.

    CLIP's text tower is causal and pools at each text's end token (the highest id, ``argmax``
    pooling), so the padding after a text's end never reaches its features: cutting the 77-token
    context to the longest text in the batch gives the same scores (to float rounding) at a fraction
    of the cost; short captions are ~10 tokens. Other towers (SigLIP, CoCa, HF text) run as they are.
    """
    import open_clip
    import torch
    from open_clip.transformer import text_global_pool

    if type(net) is not open_clip.CLIP or net.text_pool_type != "argmax" or net.attn_mask is None:
        return net.encode_text(tok)
    n = int(tok.argmax(dim=-1).max()) + 1  # through the latest end token in the batch
    tok = tok[:, :n]
    cast = net.transformer.get_cast_dtype()
    x = net.token_embedding(tok).to(cast) + net.positional_embedding[:n].to(cast)
    x = net.ln_final(net.transformer(x, attn_mask=net.attn_mask[:n, :n]))
    x = text_global_pool(x, tok, "argmax")
    if net.text_projection is None:
        return x
    if isinstance(net.text_projection, torch.nn.Linear):
        return net.text_projection(x)
    return x @ net.text_projection
