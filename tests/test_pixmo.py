"""PixMo layouts: fixtures in each allenai/pixmo-* layout (built with `datasets`, saved like the hub
repo), images fetched by the download stage from a 127.0.0.1 server, curated into our shards."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from hub_layout import card_features, save_hub_layout
from PIL import Image

from data_tools.curate import run_curation
from data_tools.download import DownloadConfig, download
from data_tools.fixtures import encode, natural_image
from data_tools.httpfixture import LocalServer, Route
from data_tools.pixmo import _read_downloads
from mmsmall.config import ConfigError
from mmsmall.processing.points import parse_points

SIZE = (120, 90)  # W, H of every served image
JPGS = {f"/p{i}.jpg": encode(natural_image(40 + i, SIZE), "JPEG") for i in range(5)}
S = datasets.Value("string")

# The cards' `dataset_info` blocks (README front matter of each hub repo), features as declared there.
# allenai/pixmo-points: one split `train` (2,376,222 rows), data/train-*; `points` is a `list:` of
# {x, y} float64, so `datasets` yields a list of dicts.
POINTS_CARD = """
features:
- {name: image_url, dtype: string}
- {name: image_sha256, dtype: string}
- name: points
  list:
  - {name: x, dtype: float64}
  - {name: 'y', dtype: float64}
- {name: count, dtype: int64}
- {name: label, dtype: string}
- {name: collection_method, dtype: string}
"""
# allenai/pixmo-points-eval: one split `test` (436 rows); points as above, plus per-object `masks`
# (a sequence of sequences of sequences of bool: one H x W mask per object).
POINTS_EVAL_CARD = """
features:
- {name: image_url, dtype: string}
- {name: image_sha256, dtype: string}
- {name: label, dtype: string}
- name: points
  list:
  - {name: x, dtype: float64}
  - {name: 'y', dtype: float64}
- name: masks
  sequence: {sequence: {sequence: bool}}
"""
# allenai/pixmo-count: splits validation (540), train (36,916), test (540); `points` is a `sequence:`
# of {x, y} float32, so `datasets` yields a dict of lists {"x": [...], "y": [...]}.
COUNT_CARD = """
features:
- {name: image_url, dtype: string}
- {name: image_sha256, dtype: string}
- {name: count, dtype: int32}
- name: points
  sequence:
  - {name: x, dtype: float32}
  - {name: 'y', dtype: float32}
- {name: label, dtype: string}
"""


def _samples(out: Path) -> list[dict]:
    metas = []
    for t in sorted(out.glob("*.tar")):
        with tarfile.open(t) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return sorted(metas, key=lambda m: m["id"])


@pytest.fixture(scope="module")
def server():
    with LocalServer({p: Route(b) for p, b in JPGS.items()}) as srv:
        yield srv


def _hub_copy(root: Path, card: str, splits: dict[str, dict]) -> Path:
    """A folder laid out like the hub repo: the card's dataset_info and configs, parquet under data/."""
    feats = card_features(card)
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=feats) for k, v in splits.items()})
    return save_hub_layout(dd, root, card_yaml=card)


def _curate(tmp: Path, name: str, root: Path, layout: str, srv=None, extra=None, **inp) -> tuple[dict, list]:
    if srv is not None:
        cfg = DownloadConfig(url_field="image_url", sha256_field="image_sha256", retries=0, read_timeout_s=5,
                             output="files")  # fmt: skip
        download(root, tmp / f"{name}_dl", cfg)
        inp["downloads"] = str(tmp / f"{name}_dl")
    summary = run_curation(
        {"inputs": [{"kind": "pixmo", "layout": layout, "path": str(root), **inp}], "out_dir": str(tmp / f"{name}_out"),
         "report": {"enabled": False}, "dedup": {"near": False}, "unit_size": 2, **(extra or {})},
        workers=1,
    )  # fmt: skip
    return summary, _samples(tmp / f"{name}_out")


def _tables(tmp: Path, name: str, ds: datasets.Dataset, layout: str, srv=None, **inp) -> tuple[dict, list]:
    return _curate(
        tmp, name, save_hub_layout(datasets.DatasetDict({"train": ds}), tmp / name), layout, srv, **inp
    )


def test_pixmo_points_are_percent_of_the_image_as_molmo_reads_them(tmp_path, server):
    """Molmo's PixMoPoints.get (olmo/data/pixmo_datasets.py) passes pixmo-points' points with
    point_scale=100, and data_formatter.format_points takes such points as already 0-100: the pixel
    position is x * W / 100, y * H / 100. PixMoPoints.download drops every image_url of
    pixmo-points-eval (hold_out_pointing_eval=True) and groups the rows by image."""
    u = [server.url(p) for p in JPGS]
    sha = hashlib.sha256(JPGS["/p0.jpg"]).hexdigest()
    rows = {  # two labels on image 0 (one a negative), one on image 1, a 404, a bad sha256, an eval image
        "image_url": [u[0], u[0], u[1], server.url("/gone.jpg"), u[2], u[3]],
        "image_sha256": [sha, sha, None, None, "f" * 64, None],
        "points": [[{"x": 12.0, "y": 30.0}, {"x": 90.5, "y": 45.25}], [], [{"x": 60.0, "y": 80.0}],
                   [{"x": 1.0, "y": 1.0}], [{"x": 2.0, "y": 2.0}], [{"x": 50.0, "y": 50.0}]],
        "count": [2, 0, 1, 1, 1, 1],
        "label": ["mug", "cat", "lamp", "x", "y", "held"],
        "collection_method": ["pointing", "counting", "pointing", "pointing", "pointing", "pointing"],
    }  # fmt: skip
    root = _hub_copy(tmp_path / "pixmo-points", POINTS_CARD, {"train": rows})
    mask = [[[False] * SIZE[0] for _ in range(SIZE[1])]]  # (1, H, W)
    ev = {"image_url": [u[3]], "image_sha256": [None], "label": ["held"], "points": [[{"x": 50.0, "y": 50.0}]],
          "masks": [mask]}  # fmt: skip
    eval_root = _hub_copy(tmp_path / "pixmo-points-eval", POINTS_EVAL_CARD, {"test": ev})
    _read_downloads.cache_clear()
    summary, samples = _curate(tmp_path, "points", root, "points", server, hold_out=str(eval_root))
    # grouped by image: 5 images, 2 kept
    assert summary["n_in"] == 5 and summary["n_kept"] == 2, (summary["dropped"], summary.get("funnel"))
    assert summary["dropped"] == {"fetch_http_404": 1, "fetch_sha256_mismatch": 1, "decontam_eval_url": 1}
    assert _read_downloads.cache_info().misses == 1  # the fetch log is read once for the run's 3 units
    by_label = {p["label"]: p["xy"] for s in samples for p in s["points"]}
    assert by_label["cat"] == []
    # hand-computed as Molmo would: percent / 100 (pixels on the 120 x 90 image: x * 1.2, y * 0.9)
    assert by_label["mug"] == [[0.12, 0.3], [0.905, 0.4525]] and by_label["lamp"] == [[0.6, 0.8]]
    s0 = next(s for s in samples if any(p["label"] == "mug" for p in s["points"]))
    assert s0["task"] == "pointing" and [m["content"] for m in s0["messages"][::2]] == [
        "Point to mug.",
        "Point to cat.",
    ]
    assert s0["messages"][3]["content"] == "There are none."
    # the rendered answer parses back to Molmo's pixel coordinates (to the text's 0.1 % precision)
    parsed = parse_points(s0["messages"][1]["content"], *SIZE)
    np.testing.assert_allclose(sorted(parsed), [(14.4, 27.0), (108.6, 40.725)], atol=0.07)


def test_pixmo_count_points_are_a_dict_of_pixel_lists_and_eval_splits_are_counts(tmp_path, server):
    """Molmo's PixMoCount.get reads `np.stack([points["x"], points["y"]], -1)` with no point_scale
    (pixels), and only for split train; validation and test are human-verified counts."""
    u = [server.url(p) for p in JPGS]
    no_points = {"x": [], "y": []}
    splits = {
        "train": {"image_url": u[:2], "image_sha256": [None, None], "count": [2, 0], "label": ["car", "dog"],
                  "points": [{"x": [10.0, 30.0], "y": [20.0, 45.0]}, no_points]},
        "validation": {"image_url": [u[2]], "image_sha256": [None], "count": [5], "label": ["bird"],
                       "points": [None]},
        "test": {"image_url": [u[3]], "image_sha256": [None], "count": [7], "label": ["cup"], "points": [no_points]},
    }  # fmt: skip
    root = _hub_copy(tmp_path / "pixmo-count", COUNT_CARD, splits)
    # stored at most 60 px wide: pixel points still refer to the image as served (120 x 90)
    _, out = _curate(tmp_path, "count", root, "count", server, extra={"normalize": {"max_side": 60}})
    assert out[0]["image"]["width"] == 60
    assert [(s["task"], s["messages"][0]["content"], s["messages"][1]["content"]) for s in out] == [
        ("counting", "How many car are there?", "2"), ("counting", "How many dog are there?", "0")]  # fmt: skip
    # hand-computed: pixels / (W, H) = (10/120, 20/90), (30/120, 45/90); the dog is a negative
    np.testing.assert_allclose(out[0]["points"][0]["xy"], [[10 / 120, 20 / 90], [0.25, 0.5]], atol=1e-6)
    assert out[1]["points"][0]["xy"] == []
    for split, label, count in (("validation", "bird", "5"), ("test", "cup", "7")):
        summary, ev = _curate(tmp_path, split, root, "count", server, split=split)
        assert summary["n_kept"] == 1, summary["dropped"]
        assert [(m["content"]) for m in ev[0]["messages"]] == [f"How many {label} are there?", count]
        assert ev[0]["points"] == []  # no points read: a count sample, not a pointing one


def test_pixmo_cap_ama_docs_clocks(tmp_path, server):
    u = [server.url(p) for p in JPGS]
    cap = datasets.Dataset.from_dict({"image_url": u[:2], "caption": ["A red mug on a desk.", "Two lamps."],
                                      "transcripts": [["a red mug"], ["lamps", "two lamps"]]})  # fmt: skip
    _, out = _tables(tmp_path, "cap", cap, "cap", server)
    assert sorted(s["messages"][1]["content"] for s in out) == ["A red mug on a desk.", "Two lamps."]
    assert {s["task"] for s in out} == {"caption"} and sorted(len(s["meta"]["transcripts"]) for s in out) == [
        1,
        2,
    ]

    ama = datasets.Dataset.from_dict({"image_url": u[2:4], "image_sha256": [hashlib.sha256(JPGS["/p2.jpg"]).hexdigest(), None],
                                      "question": ["What is this?", "Which color?"], "answer": ["A garden.", "Green."]})  # fmt: skip
    _, out = _tables(tmp_path, "ama", ama, "ama", server)
    assert sorted((s["messages"][0]["content"], s["messages"][1]["content"]) for s in out) == [
        ("What is this?", "A garden."), ("Which color?", "Green.")]  # fmt: skip

    docs_feats = datasets.Features({"image": datasets.Image(), "image_id": S,
                                    "questions": {"question": datasets.List(S), "answer": datasets.List(S)}})  # fmt: skip
    docs = datasets.Dataset.from_dict(
        {"image": [Image.open(io.BytesIO(JPGS["/p3.jpg"]))], "image_id": ["chart_7"],
         "questions": [{"question": ["Highest bar?", "Title?"], "answer": ["2019", "Sales"]}]},
        features=docs_feats,
    )  # fmt: skip
    _, out = _tables(tmp_path, "docs", docs, "docs")  # images in the rows: no download
    assert out[0]["id"] == "chart_7" and out[0]["task"] == "doc_qa"
    assert [m["content"] for m in out[0]["messages"]] == ["Highest bar?", "2019", "Title?", "Sales"]

    clocks = datasets.Dataset.from_dict({"example_id": ["c1"], "watchface_id": ["w9"], "watch_time": ["10:08:42"],
                                         "time_format": ["12h"], "image_url": [u[1]]})  # fmt: skip
    _, out = _tables(tmp_path, "clocks", clocks, "clocks", server)
    assert out[0]["task"] == "clock" and out[0]["messages"][1]["content"] == "10:08:42"

    with pytest.raises(ConfigError, match="layout 'nope'; valid: points, count"):
        _tables(tmp_path, "bad", cap, "nope")
