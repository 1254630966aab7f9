"""Decontamination reads every benchmark layout `mmsmall eval --data` accepts, and never does nothing quietly.

Each layout below is the one eval's loader for that benchmark reads (eval/tasks/*.py cite the
sources). A training set holds a copy of one benchmark image; curation must drop it and report how
many items, images and questions it indexed per benchmark.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data_tools.curate import run_curation
from data_tools.fixtures import encode, natural_image, write_jsonl
from data_tools.shards import ShardWriter
from mmsmall import cli
from mmsmall.config import ConfigError

SIZE = (96, 80)
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png(seed: int) -> bytes:
    return encode(natural_image(seed, SIZE), "PNG")


def _parquet(path: Path, columns: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {k: pa.array(v, type=IMAGE if k == "image" else None) for k, v in columns.items()}
    pq.write_table(pa.table(cols), path)


def _cells(planted: bytes) -> list[dict]:
    return [{"bytes": planted, "path": "a.png"}, {"bytes": _png(801), "path": "b.png"}]


def chartqa_repo(root: Path, planted: bytes) -> Path:  # ChartQA/test/{test_human,test_augmented}.json + png/
    (root / "test" / "png").mkdir(parents=True)
    (root / "test" / "png" / "a.png").write_bytes(planted)
    (root / "test" / "png" / "b.png").write_bytes(_png(801))
    (root / "test" / "test_human.json").write_text(
        json.dumps([{"imgname": "a.png", "query": "Peak?", "label": "3"}])
    )
    (root / "test" / "test_augmented.json").write_text(
        json.dumps([{"imgname": "b.png", "query": "Low?", "label": "1"}])
    )
    return root


def chartqa_json(root: Path, planted: bytes) -> Path:  # one of the two files
    return chartqa_repo(root, planted) / "test" / "test_human.json"


def chartqa_parquet(root: Path, planted: bytes) -> Path:  # lmms-eval hub layout data/test-*.parquet
    _parquet(root / "data" / "test-00000-of-00001.parquet",
             {"question": ["Peak?", "Low?"], "answer": ["3", "1"], "type": ["human_test", "augmented_test"],
              "image": _cells(planted)})  # fmt: skip
    return root


def docvqa_rrc(root: Path, planted: bytes, key: str = "image") -> Path:  # val_v1.0.json + documents/
    (root / "documents").mkdir(parents=True)
    (root / "documents" / "d1.png").write_bytes(planted)
    data = [{"questionId": 7, "question": "What is the date?", key: "documents/d1.png", "answers": ["1990"]}]
    (root / "val_v1.0.json").write_text(json.dumps({"dataset_name": "docvqa", "data": data}))
    return root


def infovqa_rrc(root: Path, planted: bytes) -> Path:  # InfographicVQA names its images image_local_name
    return docvqa_rrc(root, planted, key="image_local_name")


def textvqa_json(root: Path, planted: bytes) -> Path:  # TextVQA_0.5.1_val.json + train_images/
    (root / "train_images").mkdir(parents=True)
    (root / "train_images" / "abc.jpg").write_bytes(planted)
    data = [
        {"question_id": 1, "question": "what brand is this?", "image_id": "abc", "answers": ["nokia"] * 10}
    ]
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))
    return root


def ai2d_parquet(root: Path, planted: bytes) -> Path:
    _parquet(root / "data" / "test-00000-of-00001.parquet",
             {"question": ["Which is a predator?", "What eats grass?"], "options": [["rabbit", "fox"], ["cow", "lion"]],
              "answer": ["1", "0"], "image": _cells(planted)})  # fmt: skip
    return root


def ocrbench_parquet(root: Path, planted: bytes) -> Path:
    _parquet(root / "test.parquet",
             {"question": ["what is written?", "formula?"], "answer": [["STOP"], ["x"]], "dataset": ["IIIT5K"] * 2,
              "question_type": ["Regular Text Recognition"] * 2, "image": _cells(planted)})  # fmt: skip
    return root


def synth_shards(root: Path, planted: bytes) -> Path:
    with ShardWriter(root, prefix="heldout", max_count=1) as w:
        for i, data in enumerate((planted, _png(801))):
            msgs = [
                {"role": "user", "content": f"How many circles, case {i}?"},
                {"role": "assistant", "content": "2"},
            ]
            meta = {"id": f"s{i}", "source": "synth", "task": "counting", "messages": msgs, "points": []}
            w.write(f"s{i}", data, "png", meta)
    return root


LAYOUTS = {
    f.__name__: f
    for f in (chartqa_repo, chartqa_json, chartqa_parquet, docvqa_rrc, infovqa_rrc, textvqa_json,
              ai2d_parquet, ocrbench_parquet, synth_shards)
}  # fmt: skip


def _training(root: Path, planted: bytes) -> dict:
    (root / "train").mkdir()
    rows = []
    for i in range(3):
        data = planted if i == 0 else _png(500 + i)
        (root / "train" / f"{i}.png").write_bytes(data)
        rows.append({"id": f"t{i}", "image": f"train/{i}.png", "caption": f"an ordinary photo {i}"})
    write_jsonl(root / "rows.jsonl", rows)
    return {"inputs": [{"kind": "jsonl", "path": str(root / "rows.jsonl")}], "out_dir": str(root / "out"),
            "report": {"enabled": False}}  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_eval_layout_finds_the_planted_image(tmp_path, layout):
    planted = _png(700)
    bench = LAYOUTS[layout](tmp_path / "bench", planted)
    cfg = _training(tmp_path, planted) | {"decontam": {"benchmarks": [{"path": str(bench), "name": "b"}]}}
    summary = run_curation(cfg, workers=1)
    assert summary["dropped"] == {"decontam_image": 1}, summary["dropped"]
    counts = summary["decontam_benchmarks"]["b"]
    assert counts["items"] == counts["images"] == counts["questions"] >= 1


def _curate_cli(cfg: dict, tmp_path: Path, monkeypatch, capsys) -> tuple[int, str]:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(sys, "argv", ["mmsmall", "curate", str(tmp_path / "c.yaml"), "--workers", "1"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


def _unrecognized(root: Path, planted: bytes) -> Path:
    (root / "notes.json").write_text(json.dumps({"hello": "world"}))
    (root / "pic.png").write_bytes(planted)
    return root


def _parquet_without_images(root: Path, planted: bytes) -> Path:
    _parquet(root / "test.parquet", {"question": ["Peak?"], "answer": ["3"]})
    return root


NOTHING = {  # (format, benchmark): what a user may point decontamination at by mistake
    "empty_folder": ("auto", lambda root, planted: root),
    "unrecognized_folder": ("auto", _unrecognized),
    "parquet_without_images": ("auto", _parquet_without_images),
    "chartqa_folder_as_docvqa": ("docvqa", chartqa_repo),
    "docvqa_json_as_chartqa": ("chartqa", lambda root, planted: docvqa_rrc(root, planted) / "val_v1.0.json"),
    "chartqa_list_as_textvqa": ("textvqa", chartqa_json),
    "chartqa_folder_as_parquet": ("parquet", chartqa_repo),
    "chartqa_folder_as_webdataset": ("webdataset", chartqa_repo),
}


@pytest.mark.parametrize("case", list(NOTHING))
def test_a_benchmark_that_yields_nothing_stops_the_run_with_the_layouts_tried(
    tmp_path, case, monkeypatch, capsys
):
    fmt, build = NOTHING[case]
    (tmp_path / "bench").mkdir()
    bench = build(tmp_path / "bench", _png(700))
    cfg = _training(tmp_path, _png(700)) | {"decontam": {"benchmarks": [{"path": str(bench), "format": fmt}]}}
    code, err = _curate_cli(cfg, tmp_path, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: decontam benchmark ") and str(bench) in line and "layouts tried" in line
    assert f"{fmt} (" in line if fmt != "auto" else "no benchmark items found" in line
    assert not list((tmp_path / "out").glob("*.tar"))


def test_unknown_format_names_the_valid_ones(tmp_path):
    cfg = _training(tmp_path, _png(700)) | {
        "decontam": {"benchmarks": [{"path": str(tmp_path), "format": "vqa"}]}
    }
    with pytest.raises(
        ConfigError, match="valid: auto, webdataset, parquet, chartqa, docvqa, infovqa, textvqa"
    ):
        run_curation(cfg, workers=1)
