"""Several images per sample (a document's pages) through curation and the shard schema.

Schema under test (docs/INTERFACES.md, "Shard sample schema"): a sample of n >= 2 images is written
as ``{key}.0.jpg``, ``{key}.1.png``, ... with ``images: [{width, height, sha256, phash}, ...]`` in its
json; a one-image sample stays ``{key}.jpg`` with ``image: {...}``. Stock webdataset (1.0.2, installed)
groups members by the basename up to the first dot (webdataset/tariterators.py ``base_plus_ext``), so
it must see one sample per key with the extensions ``0.jpg``, ``1.png``, ...
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.config import CurateConfig
from data_tools.curate import reduce_decisions, run_curation
from data_tools.fixtures import encode, natural_image, write_jsonl
from data_tools.global_pass import global_pass, kept_keys
from data_tools.shards import ShardWriter


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _page(root: Path, name: str, seed: int, fmt: str = "JPEG", size=(160, 120)) -> tuple[str, bytes]:
    data = encode(natural_image(seed, size), fmt)
    (root / name).write_bytes(data)
    return name, data


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def _qa(q: str, a: str) -> dict:
    return {"question": q, "answer": a}


def _curate(root: Path, rows: list[dict], **extra) -> dict:
    write_jsonl(root / "rows.jsonl", rows)
    cfg = {"inputs": [{"kind": "jsonl", "path": str(root / "rows.jsonl"), "name": "docs"}],
           "out_dir": str(root / "out"), "unit_size": 2, "report": {"enabled": False}} | extra  # fmt: skip
    return run_curation(cfg, workers=1)


def _read_stock(out: Path) -> list[dict]:
    """Every raw sample of the curated shards as stock webdataset yields it (no decoding)."""
    import webdataset as wds

    tars = [str(out / s["name"]) for s in json.loads((out / "manifest.json").read_text())["shards"]]
    return list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))


def _assert_pages_in_order(sample: dict, originals: list[np.ndarray]) -> None:
    """Member ``{i}.ext`` is page i (normalization may re-encode a page, so compared by pixels) and
    the json's ``images[i]`` describes that member."""
    meta = json.loads(sample["json"])
    for i in range(len(originals)):
        member = sample[f"{i}.{'png' if i == 1 else 'jpg'}"]
        got = _pixels(member)
        assert int(np.argmin([np.abs(got - o).mean() for o in originals])) == i
        assert np.abs(got - originals[i]).mean() < 4  # the same picture (JPEG noise at most)
        assert meta["images"][i]["sha256"] == _sha(member)
        assert (meta["images"][i]["width"], meta["images"][i]["height"]) == (160, 120)


def test_mixed_one_and_three_image_samples_read_by_stock_webdataset_in_order(tmp_path):
    pages = [_page(tmp_path, f"doc_p{i}.{'png' if i == 1 else 'jpg'}", 10 + i, "PNG" if i == 1 else "JPEG")
             for i in range(3)]  # fmt: skip
    single = _page(tmp_path, "photo.jpg", 20)
    single_list = _page(tmp_path, "alone.jpg", 21)
    rows = [
        {"id": "photo", "image": single[0]} | _qa("What is shown?", "Shapes."),
        {"id": "doc", "images": [p for p, _ in pages]} | _qa("On which page is the total?", "3"),
        {"id": "alone", "images": [single_list[0]]} | _qa("What is shown?", "More shapes."),
    ]
    summary = _curate(tmp_path, rows)
    assert summary["n_kept"] == 3 and summary["dropped"] == {}

    samples = _read_stock(tmp_path / "out")
    by_key = {s["__key__"]: s for s in samples}
    assert len(by_key) == len(samples) == 3  # one sample per key, the pages not split into samples
    doc = by_key["docs_doc"]
    assert sorted(k for k in doc if not k.startswith("__")) == ["0.jpg", "1.png", "2.jpg", "json"]
    meta = json.loads(doc["json"])
    assert "image" not in meta and len(meta["images"]) == 3
    originals = [_pixels(data) for _, data in pages]
    _assert_pages_in_order(doc, originals)
    for key, (_, data) in (("docs_photo", single), ("docs_alone", single_list)):  # one image: as before
        s = by_key[key]
        assert sorted(k for k in s if not k.startswith("__")) == ["jpg", "json"]
        assert json.loads(s["json"])["image"]["sha256"] == _sha(s["jpg"])
        assert np.abs(_pixels(s["jpg"]) - _pixels(data)).mean() < 4

    # the curated shards are an input again (webdataset kind): the pages come back in order
    again = run_curation({"inputs": [{"kind": "webdataset", "path": str(tmp_path / "out")}],
                          "out_dir": str(tmp_path / "again"), "report": {"enabled": False}}, workers=1)  # fmt: skip
    assert again["n_kept"] == 3
    _assert_pages_in_order({s["__key__"]: s for s in _read_stock(tmp_path / "again")}["docs_doc"], originals)


def test_a_corrupt_page_drops_its_sample_with_the_reason_and_counts_it(tmp_path):
    good = [_page(tmp_path, f"g{i}.jpg", 40 + i)[0] for i in range(3)]
    _, full = _page(tmp_path, "torn_src.jpg", 50)
    (tmp_path / "torn.jpg").write_bytes(full[: len(full) // 2])  # page 2 of 3 cut short
    rows = [
        {"id": "ok1", "image": good[0]} | _qa("What is shown?", "Shapes."),
        {"id": "torn", "images": [good[1], "torn.jpg", good[2]]} | _qa("Which page?", "2"),
        {"id": "gone", "images": [good[1], "no_such_page.jpg"]} | _qa("Which page?", "1"),
        {"id": "both", "image": good[0], "images": [good[1], good[2]]} | _qa("Which page?", "1"),
        {"id": "empty", "images": []} | _qa("Which page?", "1"),
        {"id": "ok3", "images": [good[1], good[2], "torn_src.jpg"]} | _qa("Which page?", "3"),
    ]
    summary = _curate(tmp_path, rows, dedup={"exact": False, "near": False})
    assert summary["n_in"] == 6 and summary["n_kept"] == 2
    assert summary["dropped"] == {"truncated": 1, "missing_image": 2, "bad_annotation": 1}
    stages = {(f["stage"], f["reason"]): f["count"] for f in summary["funnel"]}
    assert stages[("validate", "truncated")] == 1 and stages[("ingest", "missing_image")] == 2
    keys = sorted(s["__key__"] for s in _read_stock(tmp_path / "out"))
    assert keys == ["docs_ok1", "docs_ok3"]
    done = [
        json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "_work" / "units").glob("*.done.json"))
    ]
    details = {d["id"]: d["detail"] for st in done for d in st["drops"]}
    assert details["torn"].startswith("image 1 of 3:")  # the page is named
    assert "image 1 of 2" in details["gone"] and "no_such_page.jpg" in details["gone"]
    assert "'image' and 'images'" in details["both"]


def test_dedup_and_decontam_consider_every_page(tmp_path):
    a = [_page(tmp_path, f"a{i}.jpg", 60 + i)[0] for i in range(3)]
    b0 = _page(tmp_path, "b0.jpg", 70)[0]
    c0 = _page(tmp_path, "c0.jpg", 71)[0]
    d0 = _page(tmp_path, "d0.jpg", 72)[0]
    (tmp_path / "a2_q60.jpg").write_bytes(encode(natural_image(62, (160, 120)), quality=60))  # a2 re-encoded
    e0, e_bench = _page(tmp_path, "e0.jpg", 73)
    twin = _page(tmp_path, "twin.jpg", 74)[0]
    rows = [
        {"id": "A", "images": a} | _qa("Which page?", "1"),
        {"id": "B", "images": [b0, a[1]]} | _qa("Which page?", "2"),  # shares A's page 1 byte for byte
        {"id": "C", "images": [c0, "a2_q60.jpg"]} | _qa("Which page?", "2"),  # A's page 2, re-encoded
        {"id": "D", "images": [d0, twin, twin]} | _qa("Which page?", "3"),  # one page twice: no duplicate
        {"id": "E", "images": [_page(tmp_path, "e1.jpg", 75)[0], e0]} | _qa("Which page?", "1"),
    ]
    bench = tmp_path / "bench"
    with ShardWriter(bench, "bench") as w:  # an eval set whose one image is E's page 1
        w.write(
            "q0", e_bench, "jpg", {"id": "q0", "messages": [{"role": "user", "content": "Which colour?"}]}
        )
    summary = _curate(tmp_path, rows, decontam={"benchmarks": [{"path": str(bench), "format": "webdataset",
                                                                 "name": "bench"}], "text": False})  # fmt: skip
    assert summary["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1, "decontam_image": 1}
    assert sorted(s["__key__"] for s in _read_stock(tmp_path / "out")) == ["docs_A", "docs_D"]
    done = [
        json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "_work" / "units").glob("*.done.json"))
    ]
    decon = next(d for st in done for d in st["drops"] if d["id"] == "E")
    assert decon["reason"] == "decontam_image" and decon["detail"].startswith("image 1:")


def _multi_units(rng: np.random.Generator, n_units: int = 4, per_unit: int = 40) -> list[dict]:
    """Candidates of 1-3 images drawing sha256s from a small pool and pHashes from near chains."""
    base = rng.integers(0, 2**63, size=60, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    pool = [f"{i:064x}" for i in range(5000, 5080)]

    def image(u: int, pos: int, k: int) -> list[str]:
        h = int(base[rng.integers(len(base))])
        for bit in rng.choice(64, size=rng.integers(0, 9), replace=False):
            h ^= 1 << int(bit)
        sha = pool[rng.integers(len(pool))] if rng.random() < 0.2 else f"{u:08x}{pos:052x}{k:04x}"
        return [sha, f"{h:016x}"]

    units = []
    for u in range(n_units):
        cands = []
        for pos in range(per_unit):
            pages = [image(u, pos, k) for k in range(int(rng.integers(1, 4)))]
            c = {"pos": pos, "id": f"id{pos % 7}", "source": f"s{u}", "text": "t", "sha256": pages[0][0],
                 "phash": pages[0][1], "clip": None, "w": 64, "h": 48, "text_len": 1}  # fmt: skip
            units_pages = {"pages": pages} if len(pages) > 1 else {}
            cands.append(c | units_pages)
        units.append({"uid": f"u{u:06d}", "cands": cands})
    return units


@pytest.mark.parametrize("parts", [1, 3])
def test_partitioned_pass_equals_the_driver_pass_on_several_images(tmp_path, parts):
    units = _multi_units(np.random.default_rng(3))
    (tmp_path / "units").mkdir()
    for st in units:
        (tmp_path / "units" / f"{st['uid']}.done.json").write_text(json.dumps(st))
    cfg = CurateConfig()
    cfg.report.grid_size = 1000
    ref = reduce_decisions(units, cfg)
    got = global_pass([(s["uid"], len(s["cands"])) for s in units], cfg, tmp_path, "local", 1, parts)
    alive = np.load(tmp_path / "reduce" / "alive.npy")
    kept = list(
        kept_keys(str(tmp_path), [s["uid"] for s in units], got["offsets"], alive, 0, len(alive), parts)
    )
    assert kept == ref["kept"]
    assert got["counts"] == Counter((d["stage"], d["reason"]) for d in ref["drops"])
    assert [d["detail"] for d in got["drops"]] == [d["detail"] for d in ref["drops"]]
    reasons = Counter(d["reason"] for d in ref["drops"])
    assert reasons["exact_duplicate"] > 0 and reasons["near_duplicate"] > 0  # the fixture exercises both
    # the rule, checked directly: no two kept samples share an image's bytes
    flat = {(uid, c["pos"]): c for uid, st in ((s["uid"], s) for s in units) for c in st["cands"]}
    seen: dict[str, tuple] = {}
    for uid, pos, _ in kept:
        c = flat[(uid, pos)]
        for sha in {p[0] for p in c.get("pages", [[c["sha256"]]])}:
            assert sha not in seen, f"{(uid, pos)} repeats a page of kept {seen[sha]}"
            seen[sha] = (uid, pos)


def test_writer_refuses_pages_without_their_json_list(tmp_path):
    with ShardWriter(tmp_path, "x") as w:
        with pytest.raises(ValueError, match="json 'images' list of 2"):
            w.write("k", [b"a", b"b"], ["jpg", "png"], {"id": "k", "image": {}})
        with pytest.raises(ValueError, match="2 image"):
            w.write("k", [b"a", b"b"], ["jpg"], {"id": "k", "images": [{}, {}]})


def test_hf_dataset_with_a_list_of_images_column(tmp_path):
    """A hub-layout dataset whose column is a list of images (``datasets.List(datasets.Image())``, as
    MuirBench's ``image_list``), named by ``images_field``; a row of one image stays a one-image sample."""
    import datasets
    from hub_layout import save_hub_layout

    pngs = [encode(natural_image(80 + i, (96, 72)), "PNG") for i in range(4)]
    feats = datasets.Features({"id": datasets.Value("string"), "image_list": datasets.List(datasets.Image()),
                               "question": datasets.Value("string"), "answer": datasets.Value("string")})  # fmt: skip
    ds = datasets.Dataset.from_dict(
        {"id": ["two", "one"], "image_list": [[Image.open(io.BytesIO(b)) for b in pngs[:3]],
                                             [Image.open(io.BytesIO(pngs[3]))]],
         "question": ["Which page is blue?", "What is shown?"], "answer": ["2", "Shapes."]},
        features=feats,
    )  # fmt: skip
    save_hub_layout(datasets.DatasetDict({"train": ds}), tmp_path / "hub")
    summary = run_curation({"inputs": [{"kind": "hf", "path": str(tmp_path / "hub"), "name": "mb",
                                        "images_field": "image_list"}],
                            "out_dir": str(tmp_path / "out"), "report": {"enabled": False}}, workers=1)  # fmt: skip
    assert summary["n_kept"] == 2, summary["dropped"]
    by_key = {s["__key__"]: s for s in _read_stock(tmp_path / "out")}
    two, one = by_key["mb_two"], by_key["mb_one"]
    assert sorted(k for k in two if not k.startswith("__")) == ["0.png", "1.png", "2.png", "json"]
    assert [_pixels(two[f"{i}.png"]).tobytes() for i in range(3)] == [_pixels(b).tobytes() for b in pngs[:3]]
    assert sorted(k for k in one if not k.startswith("__")) == ["json", "png"]
    assert "image" in json.loads(one["json"]) and len(json.loads(two["json"])["images"]) == 3


def test_points_name_their_image_and_a_wrong_index_is_dropped(tmp_path):
    """Points of a several-image sample carry the index of the image they are on (``image``, 0-based)."""
    pages = [encode(natural_image(90 + i, (320, 240))) for i in range(4)]
    entry = {"width": 320, "height": 240, "sha256": "", "phash": ""}
    with ShardWriter(tmp_path / "in", "in") as w:
        for key, idx in (("good", 1), ("bad", 5)):
            meta = {"id": key, "images": [entry, entry], "task": "pointing",
                    "points": [{"label": "mug", "xy": [[0.25, 0.5]], "image": idx}]}  # fmt: skip
            w.write(key, pages[:2] if key == "good" else pages[2:], ["jpg", "jpg"], meta)
    summary = run_curation({"inputs": [{"kind": "webdataset", "path": str(tmp_path / "in")}],
                            "out_dir": str(tmp_path / "out"), "report": {"enabled": False}}, workers=1)  # fmt: skip
    assert summary["n_kept"] == 1 and summary["dropped"] == {"point_malformed": 1}
    (sample,) = _read_stock(tmp_path / "out")
    meta = json.loads(sample["json"])
    assert meta["points"] == [{"label": "mug", "xy": [[0.25, 0.5]], "image": 1}]
    assert meta["messages"][0]["content"] == "Point to mug in image 2."


def test_csv_and_parquet_rows_give_their_images_lists(tmp_path):
    """A csv cell holds the list as JSON text; a parquet column holds a list of paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [_page(tmp_path, f"p{i}.jpg", 100 + i, size=(320, 240))[0] for i in range(4)]
    (tmp_path / "rows.csv").write_text(
        'id,images,question,answer\ncsvdoc,"[""p0.jpg"", ""p1.jpg""]",Which page?,1\n'
    )
    pq.write_table(pa.table({"id": ["pqdoc"], "images": [names[2:]], "question": ["Which page?"],
                             "answer": ["2"]}), tmp_path / "rows.parquet")  # fmt: skip
    summary = run_curation({"inputs": [{"kind": "csv", "path": str(tmp_path / "rows.csv"), "name": "c"},
                                       {"kind": "parquet", "path": str(tmp_path / "rows.parquet"), "name": "q"}],
                            "out_dir": str(tmp_path / "out"), "report": {"enabled": False}}, workers=1)  # fmt: skip
    assert summary["n_kept"] == 2, summary["dropped"]
    by_key = {s["__key__"]: s for s in _read_stock(tmp_path / "out")}
    for key, pages in (("c_csvdoc", names[:2]), ("q_pqdoc", names[2:])):
        got = [by_key[key][f"{i}.jpg"] for i in range(2)]
        assert got == [(tmp_path / n).read_bytes() for n in pages]  # 320x240 JPEGs are kept byte for byte


# MP-DocVQA's hub parquet as lmms-eval 0.7.3 reads it (tasks/multidocvqa/utils.py, the card of
# lmms-lab-encoder/MP-DocVQA): questionId, question, answers (a list literal) and image_1 .. image_20
MP_CARD = (
    "features:\n"
    + "".join(f"- name: {n}\n  dtype: string\n" for n in ("questionId", "question", "answers"))
    + "".join(f"- name: image_{i}\n  dtype: image\n" for i in range(1, 21))
)


def test_decontam_against_mp_docvqa_indexes_every_page(tmp_path):
    """``format: auto`` on MP-DocVQA's hub layout: a training page equal to any page of an eval
    document drops its sample, whichever page of either it is."""
    import datasets
    from hub_layout import card_features, save_hub_layout

    pngs = [encode(natural_image(120 + i, (96, 128)), "PNG") for i in range(8)]
    rows = [{"questionId": str(q), "question": f"What is the total of document {q}?", "answers": "['12']"}
            | {f"image_{i}": {"bytes": pngs[3 * q + i - 1], "path": None} if i <= 3 else None
               for i in range(1, 21)} for q in range(2)]  # fmt: skip
    ds = datasets.Dataset.from_list(rows, features=card_features(MP_CARD))
    bench = save_hub_layout(datasets.DatasetDict({"val": ds}), tmp_path / "mpdocvqa", card_yaml=MP_CARD)
    for i in (2, 4, 6, 7):
        (tmp_path / f"t{i}.png").write_bytes(pngs[i])
    rows = [
        {"id": "leak_doc", "images": ["t6.png", "t2.png"]} | _qa("Which page?", "2"),  # q0's page 3
        {"id": "leak_one", "image": "t4.png"} | _qa("What is shown?", "A page."),  # q1's page 2
        {"id": "clean", "images": ["t6.png", "t7.png"]} | _qa("Which page?", "1"),  # t6: leak_doc went
    ]
    summary = _curate(
        tmp_path, rows, decontam={"benchmarks": [{"path": str(bench), "name": "mp"}], "text": False}
    )
    assert summary["dropped"] == {"decontam_image": 2}, summary["dropped"]
    assert summary["decontam_benchmarks"]["mp"] == {"items": 2, "images": 6, "questions": 2}
    assert [s["__key__"] for s in _read_stock(tmp_path / "out")] == ["docs_clean"]
