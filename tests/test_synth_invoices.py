"""Multi-page synthetic invoices (data_tools/synth/invoices.py): several images per sample, answers
re-derived here from the stored items, read back by stock webdataset, curated like the other kinds."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.curate import run_curation
from data_tools.synth import CheckFailed, SynthError, core, generate, regenerate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def invoices(tmp_path_factory):
    """Written by the command the README gives."""
    out = tmp_path_factory.mktemp("invoices") / "shards"
    exe = shutil.which("mmsmall", path=str(Path(sys.executable).parent)) or "mmsmall"
    args = [exe, "synth", "invoices", "--n", "12", "--seed", "5", "--out", str(out), "--shard-size", "5"]
    proc = subprocess.run(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "wrote 12 invoices samples" in proc.stdout, proc.stderr
    return out


def _stock(out) -> dict[str, dict]:
    import webdataset as wds

    tars = [str(out / s["name"]) for s in json.loads((out / "manifest.json").read_text())["shards"]]
    return {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False)}


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _expected(meta: dict) -> dict[str, str]:
    """Both answers from the stored line items: the total with Decimal, the page after the last item."""
    sub = sum((Decimal(it["unit"]) * it["qty"] for it in meta["items"]), Decimal(0))
    tax = (sub * Decimal(meta["money"]["tax_rate"]) / 100).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return {
        "total": f"{meta['currency']}{sub + tax:,.2f}",
        "total_page": str(max(it["page"] for it in meta["items"]) + 1),
    }


def test_pages_in_order_one_sample_per_key_and_answers_rederived(invoices):
    samples = _stock(invoices)
    assert len(samples) == 12
    n_pages, terms = [], 0
    for key, s in samples.items():
        meta = json.loads(s["json"])
        n = meta["meta"]["n_pages"]
        assert sorted(k for k in s if not k.startswith("__")) == [f"{i}.png" for i in range(n)] + ["json"]
        assert "image" not in meta and len(meta["images"]) == n
        for i, entry in enumerate(meta["images"]):
            im = Image.open(io.BytesIO(s[f"{i}.png"]))
            assert (im.width, im.height) == (entry["width"], entry["height"])
        q, a = (m["content"] for m in meta["messages"])
        want = _expected(meta["meta"])
        assert a == want[meta["meta"]["question"]["qtype"]], (key, q, a, want)
        n_pages.append(n)
        terms += int(want["total_page"]) < n  # a terms page follows the total
    assert set(n_pages) == {2, 3, 4} and terms >= 1


def test_regenerate_rebuilds_every_page_byte_for_byte(invoices):
    key, s = sorted(_stock(invoices).items())[7]
    meta = json.loads(s["json"])
    pages, record = regenerate("invoices", 5, "train", meta["meta"]["index"])
    assert pages == [s[f"{i}.png"] for i in range(meta["meta"]["n_pages"])]
    assert json.dumps(record, sort_keys=True, ensure_ascii=False).encode() == s["json"]


def test_check_rejects_a_wrong_page_a_wrong_total_and_misprinted_money(tmp_path):
    gen = core.get_generator("invoices")
    for qtype, wrong in (("total_page", "1"), ("total", None)):
        opts = core.build_options("invoices", {"questions": [qtype]})
        _, _, draft = core._build(gen, opts, 3, "train", 0)
        gen.check(draft)
        answer = draft.messages[1]["content"]
        draft.messages[1]["content"] = wrong or answer.replace(
            answer[1], str((int(answer[1]) + 1) % 10 or 1), 1
        )
        with pytest.raises(CheckFailed, match="doc_answer"):
            gen.check(draft)
    draft.messages[1]["content"] = answer
    draft.meta["money"]["total"] = str(Decimal(draft.meta["money"]["total"]) + 1)
    with pytest.raises(CheckFailed, match="doc_money"):
        gen.check(draft)
    with pytest.raises(SynthError, match="2 <= min_pages <= max_pages <= 6"):
        generate("invoices", 1, 0, tmp_path / "unused", min_pages=1)
    generate("invoices", 3, 0, tmp_path / "two", max_pages=2)  # the README's --opt max_pages
    assert all(len(json.loads(s["json"])["images"]) == 2 for s in _stock(tmp_path / "two").values())


def test_curation_takes_the_invoices_as_several_image_samples(invoices, tmp_path):
    """Near dedup off, as for the other synthetic kinds (configs/curate/demo.yaml): documents drawn
    from one template fall within pHash's radius of each other."""
    summary = run_curation({"inputs": [{"kind": "webdataset", "path": str(invoices)}], "dedup": {"near": False},
                            "out_dir": str(tmp_path / "out"), "report": {"enabled": False}}, workers=1)  # fmt: skip
    assert summary["n_kept"] == 12, summary["dropped"]
    before = _stock(invoices)
    after = {json.loads(s["json"])["id"]: s for s in _stock(tmp_path / "out").values()}  # keys: source_id
    for key, s in before.items():
        n = json.loads(s["json"])["meta"]["n_pages"]
        for i in range(n):  # every page, in order, the same pixels (normalization may re-encode a PNG)
            assert np.array_equal(_pixels(after[key][f"{i}.png"]), _pixels(s[f"{i}.png"]))
    assert np.mean([json.loads(s["json"])["meta"]["n_pages"] for s in after.values()]) > 2
