"""Benchmark loaders read each data layout (fixtures built here) and fail clearly on bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eval.tasks import TASKS, EvalDataError, get_task
from eval.tasks.base import Record, register

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png_bytes(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, columns: dict[str, list], image_column: str = "image") -> Path:
    """A parquet file as HF datasets writes it: the image column a struct {bytes, path}."""
    arrays = {}
    for name, values in columns.items():
        if name == image_column or name == "masks":
            typ = IMAGE_STRUCT if name == image_column else pa.list_(IMAGE_STRUCT)
            arrays[name] = pa.array(values, type=typ)
        else:
            arrays[name] = pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)
    return path


def img_cell(i: int) -> dict:
    return {"bytes": png_bytes((10 * i % 256, 100, 50)), "path": f"img{i}.png"}


def make_chartqa_parquet(root: Path, n: int = 6) -> Path:
    write_parquet(
        root / "data" / "test-00000-of-00001.parquet",
        {
            "question": [f"What is the value of bar {i}?" for i in range(n)],
            "answer": [str(10 * i + 5) for i in range(n)],
            "type": ["human_test" if i % 2 == 0 else "augmented_test" for i in range(n)],
            "image": [img_cell(i) for i in range(n)],
        },
    )
    return root


def make_chartqa_json(root: Path) -> Path:
    (root / "test" / "png").mkdir(parents=True)
    for name, items in {
        "test_human.json": [{"imgname": "a.png", "query": "How many?", "label": "12"}],
        "test_augmented.json": [
            {"imgname": "b.png", "query": "Which year?", "label": "2014"},
            {"imgname": "a.png", "query": "Largest?", "label": "Yes"},
        ],
    }.items():
        (root / "test" / name).write_text(json.dumps(items))
    for name in ("a.png", "b.png"):
        (root / "test" / "png" / name).write_bytes(png_bytes())
    return root


def make_docvqa_parquet(root: Path, config: str = "DocVQA", n: int = 4) -> Path:
    write_parquet(
        root / config / "validation-00000-of-00001.parquet",
        {
            "questionId": [str(1000 + i) for i in range(n)],
            "question": [f"What is field {i}?" for i in range(n)],
            "answers": [[f"value {i}", f"val {i}"] for i in range(n)],
            "image": [img_cell(i) for i in range(n)],
        },
    )
    return root


def make_docvqa_rrc(root: Path) -> Path:
    (root / "documents").mkdir(parents=True)
    (root / "documents" / "d1.png").write_bytes(png_bytes())
    doc = {
        "dataset_name": "docvqa",
        "dataset_split": "val",
        "dataset_version": "1.0",
        "data": [
            {"questionId": 7, "question": "What is the date?", "image": "documents/d1.png", "docId": 1,
             "answers": ["1 May 1990", "May 1, 1990"]},
        ],
    }  # fmt: skip
    path = root / "val_v1.0.json"
    path.write_text(json.dumps(doc))
    return path


def make_textvqa(root: Path, n: int = 3) -> Path:
    return write_parquet(
        root / "validation.parquet",
        {
            "question_id": list(range(n)),
            "question": ["what brand is this?"] * n,
            "answers": [["nokia"] * 10] * n,
            "image": [img_cell(i) for i in range(n)],
        },
    ).parent


def make_ai2d(root: Path) -> Path:
    return write_parquet(
        root / "test.parquet",
        {
            "question": ["Which is a predator?", "What eats grass?"],
            "options": [["rabbit", "fox", "grass"], ["cow", "lion"]],
            "answer": ["1", "0"],
            "image": [img_cell(0), img_cell(1)],
        },
    ).parent


def make_ocrbench(root: Path) -> Path:
    return write_parquet(
        root / "test.parquet",
        {
            "question": [" what is written? ", "formula?"],
            "answer": [["STOP"], ["x^{2}+1"]],
            "dataset": ["IIIT5K", "HME100k"],
            "question_type": ["Regular Text Recognition", "Handwritten Mathematical Expression Recognition"],
            "image": [img_cell(0), img_cell(1)],
        },
    ).parent


def make_countbench(root: Path) -> Path:
    return write_parquet(
        root / "test.parquet",
        {
            "question": ["How many dogs are there?"],
            "number": [3],
            "text": ["three dogs"],
            "image": [img_cell(0)],
        },
    ).parent


def make_pixmo_count(root: Path) -> Path:
    return write_parquet(
        root / "test.parquet",
        {"question": ["<image>How many cars?"], "answer": ["4"], "image": [img_cell(0)]},
    ).parent


def make_pointing(root: Path) -> Path:
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[0:10, 0:10] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return write_parquet(
        root / "test.parquet",
        {
            "question": ["Point to the red square.", "Point to the cats."],
            "image": [img_cell(0), img_cell(1)],
            "masks": [[{"bytes": buf.getvalue(), "path": "m.png"}], []],
        },
    ).parent


def make_synth_shards(root: Path, n: int = 6) -> Path:
    """Held-out scene shards with counting and pointing samples (the DESIGN.md schema)."""
    from data_tools.shards import ShardWriter
    from mmsmall.processing.points import render_points

    with ShardWriter(root, prefix="heldout", max_count=4) as w:
        for i in range(n):
            xy = [[0.25, 0.5], [0.75, 0.5]][: i % 3]
            if i % 2 == 0:
                task, q, a = "counting", "How many circles are there?", str(len(xy))
            else:
                task, q, a = (
                    "pointing",
                    "Point to all the circles.",
                    render_points([tuple(p) for p in xy], "circle"),
                )
            meta = {
                "id": f"scene_{i:03d}",
                "source": "synth",
                "image": {"width": 40, "height": 30},
                "task": task,
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "points": [{"label": "circle", "xy": xy}],
                "meta": {},
            }
            w.write(f"scene_{i:03d}", png_bytes(), "png", meta)
    return root


# ----------------------------------------------------------------------------- tests


def test_registry_has_every_benchmark_once():
    expected = {
        "chartqa", "docvqa", "infovqa", "textvqa", "ai2d", "ocrbench", "countbench", "pixmo_count", "pointing",
        "synth_charts", "synth_docs", "synth_clocks", "synth_scenes_count", "synth_scenes_point",
    }  # fmt: skip
    assert expected <= set(TASKS)
    with pytest.raises(ValueError, match="registered twice"):
        register(TASKS["chartqa"])
    with pytest.raises(KeyError, match="valid tasks: ai2d"):
        get_task("chartqaa")


def test_chartqa_parquet(tmp_path):
    task = get_task("chartqa")
    recs = task.load(str(make_chartqa_parquet(tmp_path)), None)
    assert len(recs) == 6 and recs[1].answers == ["15"] and recs[1].meta["type"] == "augmented_test"
    assert recs[0].load_image().size == (40, 30)
    assert (
        task.prompt(recs[0], False) == "What is the value of bar 0?\nAnswer the question with a single word."
    )
    assert task.prompt(recs[0], True) == "What is the value of bar 0?"
    assert len(task.load(str(tmp_path), 2)) == 2  # limit
    # a single parquet file works too
    assert len(task.load(str(tmp_path / "data" / "test-00000-of-00001.parquet"), None)) == 6


def test_chartqa_json(tmp_path):
    task = get_task("chartqa")
    recs = task.load(str(make_chartqa_json(tmp_path)), None)
    assert [r.meta["type"] for r in recs] == ["human_test", "augmented_test", "augmented_test"]
    assert recs[1].question == "Which year?" and recs[1].answers == ["2014"]
    assert recs[2].load_image().mode == "RGB"
    # the test folder and a single file are accepted as well
    assert len(task.load(str(tmp_path / "test"), None)) == 3
    assert len(task.load(str(tmp_path / "test" / "test_human.json"), None)) == 1
    s = task.score("2000", recs[1], False)
    assert s == {"relaxed_overall": 1.0, "relaxed_augmented_split": 1.0}


def test_docvqa_and_infovqa_parquet(tmp_path):
    make_docvqa_parquet(tmp_path, "DocVQA", 4)
    make_docvqa_parquet(tmp_path, "InfographicVQA", 2)
    doc = get_task("docvqa").load(str(tmp_path), None)
    info = get_task("infovqa").load(str(tmp_path), None)
    assert len(doc) == 4 and len(info) == 2
    assert doc[0].id == "1000" and doc[0].answers == ["value 0", "val 0"]
    assert (
        get_task("docvqa")
        .prompt(doc[0], False)
        .endswith("\nAnswer the question using a single word or phrase.")
    )
    assert get_task("docvqa").score("Value 0", doc[0], False) == {"anls": 1.0}


def test_docvqa_rrc_json(tmp_path):
    path = make_docvqa_rrc(tmp_path)
    recs = get_task("docvqa").load(str(path), None)
    assert recs[0].id == "7" and recs[0].answers == ["1 May 1990", "May 1, 1990"]
    assert recs[0].load_image().size == (40, 30)
    assert len(get_task("docvqa").load(str(tmp_path), None)) == 1  # the folder holding the json


def test_other_benchmarks(tmp_path):
    tv = get_task("textvqa")
    r = tv.load(str(make_textvqa(tmp_path / "tv")), None)[0]
    assert (
        tv.prompt(r, False).startswith("What brand is this?")
        and tv.score("Nokia", r, False)["vqa_accuracy"] == 1.0
    )

    ai = get_task("ai2d")
    recs = ai.load(str(make_ai2d(tmp_path / "ai")), None)
    assert [x.answers for x in recs] == [["B"], ["A"]]
    assert "A. rabbit\nB. fox\nC. grass" in ai.prompt(recs[0], False)
    assert ai.score("B. fox", recs[0], False)["accuracy"] == 1.0

    oc = get_task("ocrbench")
    recs = oc.load(str(make_ocrbench(tmp_path / "oc")), None)
    assert recs[0].question == "what is written?"
    per = [oc.score("it says stop", recs[0], False), oc.score("x ^ {2} + 1", recs[1], False)]
    assert oc.aggregate(per)["final_score"] == 2.0

    cb = get_task("countbench")
    r = cb.load(str(make_countbench(tmp_path / "cb")), None)[0]
    assert r.answers == ["3"] and cb.score("three", r, False) == {"accuracy": 1.0, "exact": 0.0}
    assert "three dogs" not in cb.prompt(r, False)

    pc = get_task("pixmo_count")
    r = pc.load(str(make_pixmo_count(tmp_path / "pc")), None)[0]
    assert pc.prompt(r, False) == "How many cars?\nAnswer with a single number."
    assert pc.score("There are 4 cars.", r, False)["accuracy"] == 1.0


def test_pointing_masks(tmp_path):
    task = get_task("pointing")
    recs = task.load(str(make_pointing(tmp_path)), None)
    # (5, 5) px of a 40x30 mask -> 12.5 %, 16.7 %
    hit = task.score('<point x="12.5" y="16.7" alt="sq">sq</point>', recs[0], False)
    read = {"read_molmo2": 0.0, "read_molmo": 1.0}
    assert hit == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "points_outside": 0.0, **read}
    # a coordinate off the image is no point: the scores ignore it and points_outside counts it
    off = task.score('<points x1="12.5" y1="16.7" x2="140.0" y2="-2.0" alt="sq">sq</points>', recs[0], False)
    assert off == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "points_outside": 1.0, **read}
    miss = task.score('<points x1="12.5" y1="16.7" x2="90.0" y2="90.0" alt="sq">sq</points>', recs[0], False)
    assert miss["precision"] == 0.5 and miss["recall"] == 1.0
    assert task.score("There are none.", recs[1], False)["f1"] == 1.0  # nothing to point at
    assert task.score("complete garbage <point x=", recs[0], False)["f1"] == 0.0


def test_synthetic_shards(tmp_path):
    root = make_synth_shards(tmp_path / "shards")
    count = get_task("synth_scenes_count").load(str(root), None)
    point = get_task("synth_scenes_point").load(str(root), None)
    assert len(count) == 3 and len(point) == 3
    assert count[0].question == "How many circles are there?" and count[1].answers == ["2"]
    t = get_task("synth_scenes_point")
    gold = point[0].answers[0]  # the rendered gold text scores perfectly
    assert t.score(gold, point[0], False)["f1"] == 1.0
    scored = t.score(gold.replace("<point", '<point x="-5" y="-5"></point><point', 1), point[0], False)
    assert scored["f1"] == 1.0 and scored["points_outside"] == 1.0, scored
    with pytest.raises(EvalDataError, match="no samples with task in \\['chart_qa'\\]"):
        get_task("synth_charts").load(str(root), None)


# ----------------------------------------------------------------------------- bad input


def test_missing_image_names_the_sample(tmp_path):
    root = make_chartqa_json(tmp_path)
    (root / "test" / "png" / "b.png").unlink()
    recs = get_task("chartqa").load(str(root), None)
    with pytest.raises(EvalDataError, match=r"sample 'augmented_test/00000'.*test_augmented.json.*not found"):
        recs[1].load_image()
    with pytest.raises(EvalDataError, match="sample 'x': the image cannot be decoded"):
        Record(id="x", question="", answers=["a"], image_bytes=b"not a png").load_image()


def test_null_image_cell_is_an_error(tmp_path):
    write_parquet(
        tmp_path / "test.parquet",
        {"question": ["q"], "answer": ["1"], "type": ["human_test"], "image": [None]},
    )
    with pytest.raises(EvalDataError, match="sample '000000'.*missing image"):
        get_task("chartqa").load(str(tmp_path), None)


def test_empty_answer_list_names_the_sample(tmp_path):
    make_docvqa_parquet(tmp_path, n=2)
    pq.write_table(
        pa.table(
            {
                "questionId": ["1", "2"],
                "question": ["a", "b"],
                "answers": pa.array([["x"], []], type=pa.list_(pa.string())),
                "image": pa.array([img_cell(0), img_cell(1)], type=IMAGE_STRUCT),
            }
        ),
        tmp_path / "DocVQA" / "validation-00000-of-00001.parquet",
    )
    with pytest.raises(EvalDataError, match="sample '2'.*empty answer list"):
        get_task("docvqa").load(str(tmp_path), None)


def test_malformed_files(tmp_path):
    bad = tmp_path / "val.json"
    bad.write_text('{"data": [')
    with pytest.raises(EvalDataError, match="val.json: malformed JSON"):
        get_task("docvqa").load(str(bad), None)
    (tmp_path / "c" / "test").mkdir(parents=True)
    (tmp_path / "c" / "test" / "test_human.json").write_text(json.dumps([{"imgname": "a.png", "query": "q"}]))
    with pytest.raises(EvalDataError, match=r"test_human.json: item 0 .*needs keys imgname, query, label"):
        get_task("chartqa").load(str(tmp_path / "c"), None)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "test.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(EvalDataError, match="test.parquet: not a readable parquet file"):
        get_task("textvqa").load(str(tmp_path / "p"), None)
    write_parquet(tmp_path / "q" / "test.parquet", {"question": ["a"], "image": [img_cell(0)]})
    with pytest.raises(EvalDataError, match=r"missing column\(s\) \['question_id', 'answers'\]"):
        get_task("textvqa").load(str(tmp_path / "q"), None)
    with pytest.raises(EvalDataError, match="no such file or folder"):
        get_task("textvqa").load(str(tmp_path / "nowhere"), None)
    with pytest.raises(EvalDataError, match="HF_HUB_OFFLINE"):
        get_task("textvqa").load("someone/some-dataset", None)


@pytest.mark.parametrize(
    "kind,task",
    [
        ("clocks", "synth_clocks"),
        ("charts", "synth_charts"),
        ("tables", "synth_docs"),
        ("scenes", "synth_scenes_count"),
        ("scenes", "synth_scenes_point"),
    ],
)
def test_synthetic_generators_round_trip(tmp_path, kind, task):
    """Shards written by data_tools.synth load, and their own gold answers score perfectly."""
    from data_tools.synth import generate

    generate(kind, 16 if kind == "scenes" else 4, seed=0, out=tmp_path, split="test", shard_size=100)
    t = get_task(task)
    recs = t.load(str(tmp_path), None)
    assert recs
    for r in recs:
        assert t.score(r.answers[0], r, False)[t.primary] == 1.0, r.id
