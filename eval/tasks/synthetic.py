"""Held-out synthetic sets read from our webdataset shards (``data_tools.synth`` output).

Each task keeps the samples whose ``task`` field it scores and asks the sample's own question
(the training format, no extra prompt suffix). Pass the folder: ``--data synth_charts=DIR``.
"""

from __future__ import annotations

from ..metrics import anls, count_accuracy, exact_match, relaxed_accuracy
from .base import Record, Task, register
from .common import clean
from .loaders import read_shard_records
from .pointing import score_points


def _loader(name: str, kinds: tuple[str, ...]):
    def load(path: str, limit: int | None = None) -> list[Record]:
        return read_shard_records(path, kinds, name, limit)

    return load


def _prompt(record: Record, molmo: bool) -> str:
    return record.question


def _scorer(key: str, fn):
    def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
        return {key: fn(clean(raw, molmo), record.answers)}

    return score


for _name, _kinds, _key, _fn, _tokens, _style, _desc in [
    ("synth_charts", ("chart_qa",), "relaxed_accuracy", relaxed_accuracy, 16, "chart_qa", "relaxed accuracy"),
    ("synth_docs", ("doc_qa",), "anls", anls, 32, "doc_qa", "ANLS"),
    ("synth_clocks", ("clock",), "exact_match", exact_match, 16, "clock", "exact match"),
    ("synth_scenes_count", ("counting",), "accuracy", count_accuracy, 16, "point_count", "count accuracy"),
]:
    register(
        Task(
            name=_name,
            load=_loader(_name, _kinds),
            prompt=_prompt,
            score=_scorer(_key, _fn),
            primary=_key,
            max_new_tokens=_tokens,
            molmo_style=_style,
            description=f"held-out synthetic {_kinds[0]} shards, {_desc}",
        )
    )

register(
    Task(
        name="synth_scenes_point",
        load=_loader("synth_scenes_point", ("pointing",)),
        prompt=_prompt,
        score=score_points,
        primary="f1",
        max_new_tokens=192,
        molmo_style="pointing",
        description="held-out synthetic scenes, pointing F1 (distance threshold)",
    )
)
