"""InfographicVQA validation: ANLS (same layouts as DocVQA; config ``InfographicVQA``)."""

from __future__ import annotations

from .base import Task, register
from .docvqa import loader, prompt, score

TASK = register(
    Task(
        name="infovqa",
        load=loader("InfographicVQA", ("image_local_name", "image")),
        prompt=prompt,
        score=score,
        primary="anls",
        max_new_tokens=32,
        default_data="lmms-lab-encoder/DocVQA",
        split="validation",
        molmo_style="doc_qa",
        description="InfographicVQA validation, ANLS",
    )
)
