"""The model card (README.md) of a release: architecture, data, training config, eval table, license, limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mmsmall.errors import MissingInput

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{{ ' User: ' + message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}<|image|>{%- endfor -%}"
    "{{ ' User: ' }}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'] is string -%}{{ ' Assistant: ' + message['content'] + eos_token }}"
    "{%- else -%}{{ ' Assistant: ' }}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{{ eos_token }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' Assistant:' }}{%- endif -%}"
)
"""Molmo's prompt format: images first, then `` User: {question} Assistant:``; answers end with EOS.
The processor prepends BOS and expands ``<|image|>`` into the image tokens."""


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def eval_table(results: dict | None) -> str:
    """A markdown table from eval/runner.py's ``results.json`` (or a note when there is none)."""
    if not results or not results.get("tasks"):
        return "_No evaluation results were given to the export (`run_export(..., eval_results=PATH)`)._\n"
    rows = ["| task | metric | score | samples |", "|---|---|---:|---:|"]
    for name, r in sorted(results["tasks"].items()):
        rows.append(
            f"| {name} | {r.get('primary', '')} | {float(r.get('score', 0.0)):.2f} | {r.get('n', '')} |"
        )
    notes = []
    for key in ("convention", "prompt_style", "blind", "other_images", "limit"):
        if results.get(key) is not None:
            notes.append(f"{key}: `{results[key]}`")
    return "\n".join(rows) + ("\n\n" + "; ".join(notes) if notes else "") + "\n"


def model_card(
    vlm: Any,
    fmt: str,
    run_config: dict | None = None,
    eval_results: dict | None = None,
    license_id: str = "apache-2.0",
) -> str:
    """The README.md text for a release folder."""
    cfg = vlm.cfg
    llm_cfg = vlm.llm.config
    tower = (
        cfg.vision.name if cfg.vision.backend == "open_clip" else f"{cfg.vision.name} ({cfg.vision.backend})"
    )
    load = (
        "```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "model = AutoModelForImageTextToText.from_pretrained(PATH)\nprocessor = AutoProcessor.from_pretrained(PATH)\n"
        'messages = [{"role": "user", "content": [{"type": "image", "image": image}, '
        '{"type": "text", "text": "What is in the image?"}]}]\n'
        "inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, "
        'return_tensors="pt", return_dict=True)\n'
        "out = model.generate(**inputs, max_new_tokens=64)\n```\n"
        if fmt == "molmo2"
        else "```python\nimport mmsmall  # registers the mmsmall classes with the Auto factories\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "model = AutoModelForImageTextToText.from_pretrained(PATH)\nprocessor = AutoProcessor.from_pretrained(PATH)\n"
        'inputs = processor(images=image, text="What is in the image?")\n'
        "out = model.generate(**inputs, max_new_tokens=64)\n```\n"
        'or `mmsmall chat --model PATH --image IMG "question"`.\n'
    )
    data = "_unknown (no training config found next to the checkpoint)_"
    train_yaml = ""
    if run_config:
        mixture = run_config.get("data", {}).get("train", []) or []
        data = (
            "\n".join(f"- `{m.get('name') or m.get('path')}` (rate {m.get('rate', 1.0)})" for m in mixture)
            or "_no mixture recorded_"
        )
        train_yaml = "```yaml\n" + yaml.safe_dump(run_config.get("train", {}), sort_keys=False) + "```\n"
    arch = "\n".join(
        [
            "| part | what | parameters |",
            "|---|---|---:|",
            f"| vision | {tower}, features of blocks {list(vlm.vision.layer_indices)} | {_count(vlm.vision):,} |",
            f"| connector | {cfg.image.pooling_size[0]}x{cfg.image.pooling_size[1]} attention pooling + SwiGLU MLP | {_count(vlm.connector):,} |",
            f"| LLM | {cfg.llm.name or llm_cfg.model_type} ({llm_cfg.num_hidden_layers} layers, "
            f"width {llm_cfg.hidden_size}) | {_count(vlm.llm):,} |",
        ]
    )
    fmt_line = (
        "stock transformers Molmo2 (`Molmo2ForConditionalGeneration`, no remote code)"
        if fmt == "molmo2"
        else "mmsmall's own Hugging Face classes (`MMSmallForConditionalGeneration`; `import mmsmall` first)"
    )
    return f"""---
license: {license_id}
library_name: transformers
pipeline_tag: image-text-to-text
tags: [mmsmall, molmo, vision-language]
---

# {Path(str(cfg.vision.name)).name}-{llm_cfg.model_type} (mmsmall release)

A Molmo-style vision-language model trained with [mmsmall](https://example.invalid/mmsmall).
Format: {fmt_line}. Weights are sharded safetensors; `checksums.json` lists the sha256 of every shard.

## Architecture

{arch}

Images: Molmo overlap-and-resize multi-crop ({cfg.image.crop_size}px crops, up to {cfg.image.max_crops_eval}
at inference, {cfg.image.pooling_size[0]}x{cfg.image.pooling_size[1]} pooling) plus a low-resolution view.
Prompt format: `` User: {{question}} Assistant:`` (the chat template holds it).

## Use

{load}
## Training data

{data}

## Training configuration

{train_yaml or "_not recorded_"}
## Evaluation

{eval_table(eval_results)}
## License

{license_id}. The vision tower and LLM keep the licenses of the checkpoints they were initialised from,
and the training data keeps its own terms; check both before redistribution.

## Limitations

- Trained on the data listed above only; expect errors outside it (unusual charts, dense documents,
  languages other than English).
- Pointing answers are percentages of the image size; counts above what was trained on are unreliable.
- Like every VLM it can state false things confidently; do not use it where mistakes cause harm.
"""


def read_eval_results(path: str | Path | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise MissingInput(f"eval results {p} not found (expected eval/runner.py's results.json)")
    return json.loads(p.read_text())
