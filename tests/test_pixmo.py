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
from hub_layout import save_hub_layout
from PIL import Image

from data_tools.curate import run_curation
from data_tools.download import DownloadConfig, download
from data_tools.fixtures import encode, natural_image
from data_tools.httpfixture import LocalServer, Route
from mmsmall.config import ConfigError
from mmsmall.processing.points import parse_points

SIZE = (120, 90)  # W, H of every served image
JPGS = {f"/p{i}.jpg": encode(natural_image(40 + i, SIZE), "JPEG") for i in range(4)}
F, S, INT = datasets.Value("float64"), datasets.Value("string"), datasets.Value("int64")
POINTS = datasets.List({"x": F, "y": F})


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


def _curate(tmp: Path, name: str, ds: datasets.Dataset, layout: str, srv=None, **inp) -> tuple[dict, list]:
    root = save_hub_layout(datasets.DatasetDict({"train": ds}), tmp / name)
    if srv is not None:
        cfg = DownloadConfig(url_field="image_url", sha256_field="image_sha256", retries=0, read_timeout_s=5)
        download(root, tmp / f"{name}_dl", cfg)
        inp["downloads"] = str(tmp / f"{name}_dl")
    summary = run_curation(
        {"inputs": [{"kind": "pixmo", "layout": layout, "path": str(root), **inp}], "out_dir": str(tmp / f"{name}_out"),
         "report": {"enabled": False}, "dedup": {"near": False}},
        workers=1,
    )  # fmt: skip
    return summary, _samples(tmp / f"{name}_out")


def test_pixmo_points_parse_back_to_the_same_coordinates(tmp_path, server):
    u = [server.url(p) for p in JPGS]
    sha = hashlib.sha256(JPGS["/p0.jpg"]).hexdigest()
    rows = {  # two labels on image 0 (one a negative), one on image 1, a 404 and a bad sha256
        "image_url": [u[0], u[0], u[1], server.url("/gone.jpg"), u[2]],
        "image_sha256": [sha, sha, None, None, "f" * 64],
        "points": [[{"x": 12.0, "y": 30.0}, {"x": 90.5, "y": 45.25}], [], [{"x": 60.0, "y": 80.0}],
                   [{"x": 1.0, "y": 1.0}], [{"x": 2.0, "y": 2.0}]],
        "count": [2, 0, 1, 1, 1],
        "label": ["mug", "cat", "lamp", "x", "y"],
        "collection_method": ["pointing", "counting", "pointing", "pointing", "pointing"],
    }  # fmt: skip
    feats = datasets.Features({"image_url": S, "image_sha256": S, "points": POINTS, "count": INT, "label": S,
                               "collection_method": S})  # fmt: skip
    summary, samples = _curate(
        tmp_path, "points", datasets.Dataset.from_dict(rows, features=feats), "points", server
    )
    assert summary["n_in"] == 4 and summary["n_kept"] == 2, (
        summary["dropped"],
        summary.get("funnel"),
    )  # grouped by image: 4 images
    assert summary["dropped"] == {"fetch_http_404": 1, "fetch_sha256_mismatch": 1}
    by_label = {p["label"]: p["xy"] for s in samples for p in s["points"]}
    assert by_label["cat"] == []
    for label, raw in (("mug", rows["points"][0]), ("lamp", rows["points"][2])):
        px = sorted((x * SIZE[0], y * SIZE[1]) for x, y in by_label[label])
        np.testing.assert_allclose(px, sorted((p["x"], p["y"]) for p in raw), atol=1e-3)
    s0 = next(s for s in samples if any(p["label"] == "mug" for p in s["points"]))
    assert s0["task"] == "pointing" and [m["content"] for m in s0["messages"][::2]] == [
        "Point to mug.",
        "Point to cat.",
    ]
    assert s0["messages"][3]["content"] == "There are none."
    # the rendered answer parses back to the same pixel coordinates (to the text's 0.1 % precision)
    parsed = parse_points(s0["messages"][1]["content"], *SIZE)
    np.testing.assert_allclose(sorted(parsed), [(12.0, 30.0), (90.5, 45.25)], atol=0.07)


def test_pixmo_count_cap_ama_docs_clocks(tmp_path, server):
    u = [server.url(p) for p in JPGS]
    count = datasets.Dataset.from_dict(
        {"image_url": u[:2], "image_sha256": [None, None], "count": [2, 0], "label": ["car", "dog"],
         "points": [[{"x": 10.0, "y": 20.0}, {"x": 30.0, "y": 40.0}], []]},
        features=datasets.Features({"image_url": S, "image_sha256": S, "count": INT, "label": S, "points": POINTS}),
    )  # fmt: skip
    _, out = _curate(tmp_path, "count", count, "count", server)
    assert [(s["task"], s["messages"][0]["content"], s["messages"][1]["content"]) for s in out] == [
        ("counting", "How many car are there?", "2"), ("counting", "How many dog are there?", "0")]  # fmt: skip
    assert len(out[0]["points"][0]["xy"]) == 2

    cap = datasets.Dataset.from_dict({"image_url": u[:2], "caption": ["A red mug on a desk.", "Two lamps."],
                                      "transcripts": [["a red mug"], ["lamps", "two lamps"]]})  # fmt: skip
    _, out = _curate(tmp_path, "cap", cap, "cap", server)
    assert sorted(s["messages"][1]["content"] for s in out) == ["A red mug on a desk.", "Two lamps."]
    assert {s["task"] for s in out} == {"caption"} and sorted(len(s["meta"]["transcripts"]) for s in out) == [
        1,
        2,
    ]

    ama = datasets.Dataset.from_dict({"image_url": u[2:4], "image_sha256": [hashlib.sha256(JPGS["/p2.jpg"]).hexdigest(), None],
                                      "question": ["What is this?", "Which color?"], "answer": ["A garden.", "Green."]})  # fmt: skip
    _, out = _curate(tmp_path, "ama", ama, "ama", server)
    assert sorted((s["messages"][0]["content"], s["messages"][1]["content"]) for s in out) == [
        ("What is this?", "A garden."), ("Which color?", "Green.")]  # fmt: skip

    docs_feats = datasets.Features({"image": datasets.Image(), "image_id": S,
                                    "questions": {"question": datasets.List(S), "answer": datasets.List(S)}})  # fmt: skip
    docs = datasets.Dataset.from_dict(
        {"image": [Image.open(io.BytesIO(JPGS["/p3.jpg"]))], "image_id": ["chart_7"],
         "questions": [{"question": ["Highest bar?", "Title?"], "answer": ["2019", "Sales"]}]},
        features=docs_feats,
    )  # fmt: skip
    _, out = _curate(tmp_path, "docs", docs, "docs")  # images in the rows: no download
    assert out[0]["id"] == "chart_7" and out[0]["task"] == "doc_qa"
    assert [m["content"] for m in out[0]["messages"]] == ["Highest bar?", "2019", "Title?", "Sales"]

    clocks = datasets.Dataset.from_dict({"example_id": ["c1"], "watchface_id": ["w9"], "watch_time": ["10:08:42"],
                                         "time_format": ["12h"], "image_url": [u[1]]})  # fmt: skip
    _, out = _curate(tmp_path, "clocks", clocks, "clocks", server)
    assert out[0]["task"] == "clock" and out[0]["messages"][1]["content"] == "10:08:42"

    with pytest.raises(ConfigError, match="layout 'nope'; valid: points, count"):
        _curate(tmp_path, "bad", cap, "nope")
