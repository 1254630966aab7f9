"""The partitioned global pass makes the same decisions as the in-driver ``reduce_decisions``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_tools.config import CurateConfig
from data_tools.curate import reduce_decisions
from data_tools.global_pass import global_pass, kept_keys, report_view


def _units(rng: np.random.Generator, n_units: int = 5, per_unit: int = 60) -> list[dict]:
    """Candidates with repeated bytes, pHash chains within a few bits, colliding keys and tied scores."""
    base = rng.integers(0, 2**63, size=40, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    units, shas = [], [f"{i:064x}" for i in range(10_000, 10_060)]
    for u in range(n_units):
        cands = []
        for pos in range(per_unit):
            h = int(base[rng.integers(len(base))])
            for bit in rng.choice(64, size=rng.integers(0, 9), replace=False):  # 0-8 flipped bits
                h ^= 1 << int(bit)
            sha = shas[rng.integers(len(shas))] if rng.random() < 0.3 else f"{u:08x}{pos:056x}"
            ident = rng.choice(["a", "a_2", "a_2_2", "b", f"id{pos}", f"id{pos}_3"])  # keys that collide
            clip = round(float(rng.normal(0.3, 0.05)), 2)  # rounded: many ties
            cands.append({"pos": pos * 2, "id": str(ident), "source": f"s{u % 2}", "text": f"t{u}.{pos}",
                          "sha256": sha, "phash": f"{h:016x}", "clip": clip, "w": 64, "h": 48,
                          "text_len": 9})  # fmt: skip
        units.append({"uid": f"u{u:06d}", "cands": cands})
    units.insert(2, {"uid": "u999999", "cands": []})  # a unit whose every sample was dropped earlier
    return units


def _write(work, units: list[dict]) -> None:
    (work / "units").mkdir(parents=True)
    for st in units:
        (work / "units" / f"{st['uid']}.done.json").write_text(json.dumps(st))


@pytest.mark.parametrize(
    "clip",
    [{"quantile": 0.37}, {"quantile": 0.5}, {"threshold": 0.3}, {"quantile": 0.0}, None],
)
@pytest.mark.parametrize("parts", [1, 3])
def test_partitioned_pass_equals_the_driver_pass(tmp_path, clip, parts):
    units = _units(np.random.default_rng(7))
    _write(tmp_path, units)
    cfg = CurateConfig()
    cfg.report.grid_size = 5
    if clip is not None:
        cfg.clip.enabled, cfg.clip.threshold, cfg.clip.quantile = (
            True,
            clip.get("threshold"),
            clip.get("quantile"),
        )
    ref = reduce_decisions(units, cfg)
    got = global_pass([(s["uid"], len(s["cands"])) for s in units], cfg, tmp_path, "local", 1, parts)

    assert got["clip_threshold"] == ref["clip_threshold"]  # exact, not approximately
    alive = np.load(tmp_path / "reduce" / "alive.npy")
    uids = [s["uid"] for s in units]
    kept = list(kept_keys(str(tmp_path), uids, got["offsets"], alive, 0, len(alive), parts))
    assert kept == ref["kept"] and sum(got["kept_per_unit"]) == len(ref["kept"])
    assert got["kept_head"] == ref["kept"][: cfg.report.grid_size]
    from collections import Counter

    assert got["counts"] == Counter((d["stage"], d["reason"]) for d in ref["drops"])
    reasons = {d["reason"] for d in ref["drops"]}
    assert {"exact_duplicate", "near_duplicate"} <= reasons  # the fixture exercises both
    if clip is not None and clip.get("quantile", 1) > 0:
        assert "clip_low" in reasons
    assert any(k.endswith("_2_2") for _, _, k in kept)  # renames that meet another sample's own key
    shown = Counter()
    first = []
    for d in ref["drops"]:
        shown[d["reason"]] += 1
        if shown[d["reason"]] <= cfg.report.grid_size:
            first.append(d)
    assert got["drops"] == first  # same records, same details (representatives), same order

    view = report_view(tmp_path, uids, got["kept_head"], got["clip_threshold"], cfg)
    thr = ref["clip_threshold"]
    if thr is not None:  # the report's borderline grid: nearest the threshold, ties by (unit, pos)
        cands = {(s["uid"], c["pos"]): c for s in units for c in s["cands"]}
        near = sorted((abs(c["clip"] - thr), k) for k, c in cands.items() if abs(c["clip"] - thr) <= 0.02)
        assert [(u, p) for u, p, _, _ in view["border"]] == [k for _, k in near[: cfg.report.grid_size]]
    assert len(view["clip"]) == sum(len(s["cands"]) for s in units)  # every candidate's score, histogrammed


@pytest.mark.parametrize("fetch", [1, 1 << 16])  # 1: narrow through every 16-bit digit of the sort key
def test_exact_quantile_matches_numpy_on_ties_and_signs(tmp_path, monkeypatch, fetch):
    from data_tools import global_pass as gp

    monkeypatch.setattr(gp, "FETCH", fetch)

    rng = np.random.default_rng(3)
    for trial in range(6):
        n = int(rng.integers(1, 400))
        scores = np.concatenate([rng.normal(0, 1, n), np.zeros(n // 3), -np.abs(rng.normal(0, 1e-300, 3))])
        scores = np.round(scores, int(rng.integers(1, 6)))
        rng.shuffle(scores)
        work = tmp_path / f"t{trial}"
        (work / "reduce" / "cols").mkdir(parents=True)
        chunks = np.array_split(scores, 3)
        offsets = np.r_[0, np.cumsum([len(c) for c in chunks])]
        for u, c in enumerate(chunks):
            np.savez(work / "reduce" / "cols" / f"u{u:06d}.npz", clip=c)
        np.save(work / "reduce" / "alive.npy", np.ones(len(scores), bool))
        groups = [[(f"u{u:06d}", int(offsets[u]), len(c))] for u, c in enumerate(chunks)]
        for q in (0.0, 0.1, 0.5, 0.73, 0.999):
            got = gp._quantile(len(scores), q, groups, str(work), "local", 1)
            assert got == float(np.quantile(scores, q)), (trial, q)
