"""User errors anywhere in the CLI: exit code 2 and one line on stderr, before anything launches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export_integrity import saved  # noqa: F401 - a tiny saved model (module fixture)

from data_tools.fixtures import png_with_header_size
from mmsmall import cli

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "configs/train/tiny-pretrain.yaml")


def _cli(args: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    """Run ``mmsmall ARGS`` in this process; (exit code, non-empty stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["mmsmall", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, [x for x in capsys.readouterr().err.splitlines() if x.strip()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli_inputs")
    (d / "zero.png").write_bytes(b"")
    good = d / "good.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype("uint8")).save(good)
    (d / "truncated.png").write_bytes(good.read_bytes()[:120])
    (d / "bomb.png").write_bytes(png_with_header_size(60000, 60000))
    (d / "shards").mkdir()
    return d


def _cases(d: Path, model: str) -> list[tuple[list[str], str]]:
    train = ["train", TRAIN, f"data.train=[{{path: {d / 'shards'}}}]"]
    return [
        ([*train[:2], "train.micro_batch_size=-2"], "train.micro_batch_size: -2"),
        ([*train[:2], "train.steps=-1"], "train.steps: -1"),
        ([*train[:2], "train.lr=abc"], "train.lr: 'abc' is not a section"),
        ([*train[:2], "data.train=[]"], "data.train: empty"),
        ([*train[:2], "data.train=[{path: /nonexistent/shards}]"], "data.train[0].path: no shards"),
        (train, "data.train[0].path: no shards"),  # an empty folder
        (["export", model, str(d / "rel"), "--format", "onnx"], "export format 'onnx'"),
        (["curate", str(ROOT / "configs/curate/example.yaml"), "--executor", "bogus"], "--executor 'bogus'"),
        (["eval", "--model", model, "--tasks", "nope"], "unknown eval task 'nope'"),
        (["eval", "--model", model, "--tasks", "chartqa", "--batch-size", "0"], "--batch-size must be >= 1"),
        *((["chat", "What?", "--model", model, "--image", str(d / f)], f) for f in ("zero.png", "truncated.png", "bomb.png")),
        (["predict", str(d / "only_bad"), "--model", model], "none of its 2 images could be read"),
    ]  # fmt: skip


def test_every_user_error_is_exit_2_and_one_line(saved, inputs, tmp_path, monkeypatch, capsys):  # noqa: F811
    (inputs / "only_bad").mkdir(exist_ok=True)
    for f in ("zero.png", "truncated.png"):
        (inputs / "only_bad" / f).write_bytes((inputs / f).read_bytes())
    monkeypatch.chdir(tmp_path)
    for args, expected in _cases(inputs, str(saved)):
        code, err = _cli(args, monkeypatch, capsys)
        assert code == 2, (args, err)
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (args, err)
    assert not (inputs / "rel").exists()  # nothing was written by a refused export


def test_train_refuses_unknown_model_names(monkeypatch, capsys, tmp_path):
    from data_tools.fixtures import encode, natural_image
    from data_tools.shards import ShardWriter

    shards = tmp_path / "s"
    with ShardWriter(shards, prefix="x") as w:
        w.write("a", encode(natural_image(0, (64, 64))), "jpg", {"id": "a", "messages": []})
    train = ["train", TRAIN, f"data.train=[{{path: {shards}}}]"]
    for overrides, expected in (
        (["model.vision.name=NoSuchViT", "model.vision.custom=null"], "model.vision.name: 'NoSuchViT'"),
        (
            ["model.llm.name=nobody/no-such-llm", "model.llm.custom=null"],
            "model.llm.name: 'nobody/no-such-llm'",
        ),
        # a later stage trains its folder's model, so only that folder is checked, not the config's names
        (
            [
                "model.llm.name=nobody/no-such-llm",
                "model.llm.custom=null",
                f"train.init_from={tmp_path / 'none'}",
            ],
            "train.init_from: ",
        ),
    ):
        code, err = _cli([*train, *overrides], monkeypatch, capsys)
        assert code == 2 and len(err) == 1 and expected in err[0], err


def test_predict_skips_unreadable_images_and_keeps_every_answer(saved, inputs, tmp_path, caplog):  # noqa: F811
    from mmsmall.inference.chat import predict

    jsonl = predict(str(saved), str(inputs), str(tmp_path / "pred"), question="What?", max_new_tokens=2)
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["good.png"]
    assert "skipped 3 unreadable image(s): bomb.png, truncated.png, zero.png" in caplog.text


def test_export_refuses_a_non_empty_folder_and_lists_only_its_own_shards(saved, tmp_path):  # noqa: F811
    from mmsmall.export import run_export

    out = tmp_path / "release"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "other.safetensors").write_bytes(b"not part of the release")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_export(str(saved), str(out))
    run_export(str(saved), str(out), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # the user's files stay
    assert (out / "other.safetensors").read_bytes() == b"not part of the release"
    listed = json.loads((out / "checksums.json").read_text())["files"]
    assert "other.safetensors" not in listed and listed
    release = [p for p in out.iterdir() if p.name not in ("notes.txt", "other.safetensors")]
    assert len({p.stat().st_mode & 0o777 for p in release}) == 1  # one file mode for the whole release


def test_eval_missing_image_is_one_line(saved, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`mmsmall eval --data chartqa=...` with one image gone, DataLoader workers on (issue 23):
    one error line naming the sample and file, no worker traceback."""
    from test_eval_tasks import make_chartqa_json

    root = make_chartqa_json(tmp_path / "c")
    (root / "test" / "png" / "b.png").unlink()
    args = ["eval", "--model", str(saved), "--tasks", "chartqa", "--data", f"chartqa={root}",
            "--out", str(tmp_path / "out"), "--num-workers", "2", "--max-new-tokens", "2"]  # fmt: skip
    code, err = _cli(args, monkeypatch, capsys)
    err = [x for x in "\n".join(err).replace("\r", "\n").splitlines() if x.strip() and "%|" not in x]
    assert code == 2 and len(err) == 1, err
    assert "augmented_test/00000" in err[0] and "b.png" in err[0] and "Traceback" not in err[0]
