"""Synthetic images with verified answers: charts, docs, multi-page invoices, tables, clocks, scenes.

Public entry points::

    generate(kind, n, seed, out, split="train", shard_size=500, **options) -> manifest dict
    regenerate(kind, seed, split, index, **options) -> (image_bytes | [page bytes], record)
    check_disjoint(train_dir, eval_dir) -> {"train": n, "eval": m, "shared": []}
    REGISTRY  # kind -> Generator(name, make, check, options, summary)

Importing this package registers every generator (one module per kind).
"""

from data_tools.synth import charts, clocks, docs, invoices, scenes, tables  # noqa: F401,E402  (registers)
from data_tools.synth.core import (
    REGISTRY,
    CheckFailed,
    Draft,
    Generator,
    SynthError,
    check_disjoint,
    generate,
    get_generator,
    regenerate,
    sample_rng,
)

KINDS = tuple(sorted(REGISTRY))

__all__ = [
    "KINDS",
    "REGISTRY",
    "CheckFailed",
    "Draft",
    "Generator",
    "SynthError",
    "check_disjoint",
    "generate",
    "get_generator",
    "regenerate",
    "sample_rng",
]
