"""Hugging Face data in through `datasets`: curation `kind: hf` and every eval task's hub layout.

Every dataset here is built with the `datasets` library (``datasets.Image`` columns) and saved
either with ``save_to_disk`` or as a folder laid out like the hub repo (``data/*.parquet`` and a
README whose front matter lists the configs), then read through ``mmsmall.data.hfdata.load_hf``:
the function a hub id goes through.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import pytest
from hub_layout import save_hub_layout
from PIL import Image

from data_tools.curate import run_curation
from data_tools.fixtures import encode, natural_image
from eval.tasks import get_task
from mmsmall.data.hfdata import HFDataError, iter_hf_rows, load_hf


def _img(seed: int, size=(96, 72)) -> Image.Image:
    return Image.open(io.BytesIO(encode(natural_image(seed, size), "PNG")))


def _captions(n: int) -> datasets.Dataset:
    feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                               "caption": datasets.Value("string")})  # fmt: skip
    return datasets.Dataset.from_dict(
        {
            "id": [f"s{i}" for i in range(n)],
            "image": [_img(i) for i in range(n)],
            "caption": [f"a photo number {i} of a garden" for i in range(n)],
        },
        features=feats,
    )


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_hf_dataset_curates_to_shards_from_disk_hub_folder_and_stream(tmp_path):
    ds = _captions(5)
    ds.save_to_disk(str(tmp_path / "disk"))
    save_hub_layout(datasets.DatasetDict({"train": ds}), tmp_path / "hub")
    base = {"report": {"enabled": False}, "unit_size": 2, "dedup": {"near": False}}
    runs = {}
    for name, inp in {
        "disk": {"kind": "hf", "path": str(tmp_path / "disk")},
        "hub": {"kind": "hf", "path": str(tmp_path / "hub"), "name": "disk"},
        "stream": {"kind": "hf", "path": str(tmp_path / "hub"), "name": "disk", "streaming": True},
    }.items():
        summary = run_curation({**base, "inputs": [inp], "out_dir": str(tmp_path / f"o_{name}")}, workers=1)
        assert summary["n_in"] == summary["n_kept"] == 5, (name, summary)
        runs[name] = _tars(tmp_path / f"o_{name}")
    assert runs["disk"] and runs["disk"] == runs["hub"] == runs["stream"]
    with tarfile.open(tmp_path / "o_hub" / next(iter(runs["hub"]))) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert sorted(m["id"] for m in metas) == [f"s{i}" for i in range(5)]
    assert {m["messages"][1]["content"] for m in metas} == {
        f"a photo number {i} of a garden" for i in range(5)
    }
    assert {(m["image"]["width"], m["image"]["height"]) for m in metas} == {(96, 72)}


def test_load_hf_keeps_images_encoded_and_reports_bad_input(tmp_path):
    save_hub_layout(datasets.DatasetDict({"test": _captions(3)}), tmp_path / "hub")
    ds = load_hf(tmp_path / "hub", split="test")
    cell = ds[0]["image"]
    assert set(cell) == {"bytes", "path"} and Image.open(io.BytesIO(cell["bytes"])).size == (96, 72)
    stream = load_hf(tmp_path / "hub", split="test", streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and [r["id"] for r in stream] == ["s0", "s1", "s2"]
    with pytest.raises(HFDataError, match=r"missing column\(s\) \['answer'\]"):
        list(iter_hf_rows(tmp_path / "hub", ["id", "answer"], split="test"))
    save_hub_layout(datasets.DatasetDict({"train": _captions(1), "test": _captions(1)}), tmp_path / "two")
    with pytest.raises(HFDataError, match="no split 'validation'; splits here: train, test"):
        load_hf(tmp_path / "two", split="validation")
    with pytest.raises(HFDataError, match="HF_HUB_OFFLINE"):
        load_hf("someone/not-here", split="test")


# ----------------------------------------------------------------------------- eval hub layouts


def _feats(**cols) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), **cols})


S, L = datasets.Value("string"), datasets.List(datasets.Value("string"))


def _eval_set(n: int, feats: datasets.Features, **cols) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image": [_img(i) for i in range(n)], **cols}, features=feats)


def test_every_eval_task_loads_its_hub_layout_from_a_local_folder(tmp_path):
    n = 3
    q = [f"question {i}?" for i in range(n)]
    sets = {
        "chartqa": (_eval_set(n, _feats(question=S, answer=S, type=S), question=q, answer=["1", "2", "3"],
                              type=["human_test", "augmented_test", "human_test"]), None),
        "docvqa": (_eval_set(n, _feats(questionId=S, question=S, answers=L), questionId=["a", "b", "c"],
                             question=q, answers=[["x"], ["y"], ["z"]]), "DocVQA"),
        "infovqa": (_eval_set(2, _feats(questionId=S, question=S, answers=L), questionId=["i", "j"],
                              question=q[:2], answers=[["p"], ["q"]]), "InfographicVQA"),
        "textvqa": (_eval_set(n, _feats(question_id=S, question=S, answers=L), question_id=["0", "1", "2"],
                              question=q, answers=[["cat"] * 10] * n), None),
        "ai2d": (_eval_set(n, _feats(question=S, options=L, answer=S), question=q,
                           options=[["red", "blue"]] * n, answer=["1", "0", "1"]), None),
        "ocrbench": (_eval_set(n, _feats(question=S, answer=S, dataset=S, question_type=S), question=q,
                               answer=["ab", "cd", "ef"], dataset=["IIIT5K"] * n,
                               question_type=["Regular Text Recognition"] * n), None),
        "countbench": (_eval_set(n, _feats(question=S, number=datasets.Value("int64")), question=q,
                                 number=[1, 2, 3]), None),
        "pixmo_count": (_eval_set(n, _feats(question=S, answer=S), question=q, answer=["4", "5", "6"]), None),
        "pointing": (_eval_set(2, _feats(question=S, masks=datasets.List(datasets.Image())),
                               question=["Point to the square.", "Point to the moon."],
                               masks=[[_img(9, (40, 30))], []]), None),
    }  # fmt: skip
    (tmp_path / "docs").mkdir()
    for name, (ds, config) in sets.items():
        split = {"docvqa": "validation", "infovqa": "validation", "textvqa": "validation"}.get(name, "test")
        root = tmp_path / "docs" if config else tmp_path / name
        save_hub_layout(datasets.DatasetDict({split: ds}), root, config)
        recs = get_task(name).load(str(root), None)
        assert len(recs) == len(ds), name
        first = recs[0]
        assert first.image_bytes is not None and first.image is None, name  # decoded later, in workers
        assert first.load_image().size == (96, 72), name
        if name == "pointing":
            assert len(first.meta["mask_cells"]) == 1 and recs[1].meta["mask_cells"] == []
        else:
            assert first.question.startswith("question 0"), name
    assert [r.id for r in get_task("docvqa").load(str(tmp_path / "docs"), None)] == ["a", "b", "c"]
    assert [r.answers for r in get_task("infovqa").load(str(tmp_path / "docs"), 1)] == [["p"]]


def test_list_tasks_command():
    """`mmsmall eval --list-tasks`, through the typer app the `mmsmall` command runs (in process)."""
    from typer.testing import CliRunner

    from mmsmall.cli import app

    out = CliRunner().invoke(app, ["eval", "--list-tasks"])
    assert out.exit_code == 0, out.output
    rows = {line.split()[0]: line.split()[1] for line in out.output.splitlines() if line.strip()}
    assert {"chartqa", "docvqa", "infovqa", "textvqa", "ai2d", "ocrbench", "pointing"} <= set(rows)
    assert rows["chartqa"] == "lmms-lab-encoder/ChartQA"


def test_two_local_folders_of_the_same_name_give_their_own_rows(tmp_path):
    """`load_dataset(folder)` alone caches by the folder's name; load_hf must not serve stale rows."""
    for n in (1, 2):
        save_hub_layout(datasets.DatasetDict({"train": _captions(n)}), tmp_path / str(n) / "same")
    assert [len(load_hf(tmp_path / str(n) / "same", split="train")) for n in (1, 2)] == [1, 2]
