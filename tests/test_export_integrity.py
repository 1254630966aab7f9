"""Release integrity: a tampered or truncated shard fails loudly naming the file (our HF format,
the stock Molmo2 folder through load_molmo2, and folders without checksums); loading reads
safetensors only; chat / predict answer from an export and draw points."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsmall.config import ModelConfig, load_config
from mmsmall.export.safetensors_io import ShardIntegrityError, load_sharded, verify_shards, write_sharded
from mmsmall.model.vlm import VLM
from mmsmall.processing.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny-molmo2.yaml", cls=ModelConfig)
    vlm = VLM(cfg, build_tokenizer(cfg.tokenizer)).eval()
    out = tmp_path_factory.mktemp("saved")
    vlm.save_pretrained(out)
    return out


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["tamper", "truncate"])
@pytest.mark.parametrize("fmt", ["mmsmall", "molmo2"])
def test_damaged_shard_is_refused(saved, tmp_path, fmt, damage):
    from mmsmall.export import load_molmo2, run_export

    out = run_export(str(saved), str(tmp_path / fmt), fmt=fmt, max_shard_size="300KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    victim = shards[-1]
    if damage == "tamper":
        _flip_byte(victim)
        expected = "sha256 mismatch"
    else:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        expected = "truncated"
    if fmt == "mmsmall":
        from transformers import AutoModelForImageTextToText

        with pytest.raises(ShardIntegrityError, match=re.escape(victim.name)) as err:
            AutoModelForImageTextToText.from_pretrained(out)
    else:
        with pytest.raises(ShardIntegrityError, match=re.escape(victim.name)) as err:
            load_molmo2(out)
    assert expected in str(err.value)


def test_without_checksums_a_truncated_shard_is_named(tmp_path):
    state = {"a": torch.randn(64, 64), "b": torch.randn(64, 64), "c": torch.arange(10)}
    paths = write_sharded(state, tmp_path, max_shard_bytes=20_000)
    assert len(paths) == 2  # [a], [b, c]: each shard at most 20 kB unless one tensor is bigger
    loaded = load_sharded(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    (tmp_path / "checksums.json").unlink()
    paths[1].write_bytes(paths[1].read_bytes()[:5])
    with pytest.raises(ShardIntegrityError, match=re.escape(paths[1].name)):
        verify_shards(tmp_path)
    with pytest.raises(ShardIntegrityError, match="checksums.json is missing"):
        verify_shards(tmp_path, require_checksums=True)


def test_loading_code_reads_safetensors_only():
    """Every torch.load in the release/loading code passes weights_only=True."""
    files = [
        *sorted((ROOT / "mmsmall/export").glob("*.py")),
        *sorted((ROOT / "mmsmall/inference").glob("*.py")),
    ]
    calls = 0
    for f in files:
        for m in re.finditer(r"torch\.load\(([^)]*)\)", f.read_text()):
            calls += 1
            assert "weights_only=True" in m.group(1), (
                f"{f.name}: torch.load({m.group(1)}) without weights_only=True"
            )
    assert calls >= 1  # the DeepSpeed consolidation reads .pt files; it must do so safely


def test_chat_and_predict_draw_points(saved, tmp_path):
    from mmsmall.inference.chat import chat, predict

    out = tmp_path / "release"
    from mmsmall.export import run_export

    run_export(str(saved), str(out), fmt="molmo2")
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rng = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray((rng.rand(70 + 10 * i, 90, 3) * 255).astype("uint8")).save(img_dir / f"im{i}.png")
    answer = chat(str(out), str(img_dir / "im0.png"), "What is shown?", max_new_tokens=4)
    assert isinstance(answer, str)
    jsonl = predict(
        str(out), str(img_dir), str(tmp_path / "pred"), question="Point to the dot.", max_new_tokens=4
    )
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["im0.png", "im1.png", "im2.png"] and all("answer" in r for r in rows)
    # A shard set: each sample's own first question is asked.
    import io

    from data_tools.shards import ShardWriter

    with ShardWriter(tmp_path / "shards", prefix="toy", max_count=2) as w:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray((rng.rand(60, 80, 3) * 255).astype("uint8")).save(buf, "PNG")
            msgs = [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "x"}]
            w.write(f"s{i}", buf.getvalue(), "png", {"id": f"s{i}", "task": "vqa", "messages": msgs})
    jsonl = predict(str(out), str(tmp_path / "shards"), str(tmp_path / "pred2"), max_new_tokens=2)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted((r["key"], r["question"]) for r in rows) == [(f"s{i}", f"Question {i}?") for i in range(3)]
    # A random model rarely points: an answer with points is saved as a PNG with them drawn.
    from mmsmall.inference.chat import GOLD_COLOR, PRED_COLOR, answer_record

    blank = Image.new("RGB", (50, 40))
    rec = answer_record("k", blank, "Point.", '<point x="50.0" y="50.0" alt="dot">dot</point>', tmp_path,
                        gold=[(10.0, 10.0)])  # fmt: skip
    assert rec["points"] == [[25.0, 20.0]] and rec["drawn"] == "k.png"
    drawn = Image.open(tmp_path / "k.png").convert("RGB")
    scale = 448 / 40  # enlarged to a viewable size: 448 px on the short side
    assert drawn.width == round(50 * scale) and drawn.height > round(40 * scale)  # + the caption band
    assert (
        drawn.getpixel((round(25 * scale), round(20 * scale))) == PRED_COLOR
    )  # predicted: red dot in a ring
    assert drawn.getpixel((round(10 * scale), round(10 * scale))) == GOLD_COLOR  # gold: a green cross
    band = np.asarray(drawn)[round(40 * scale) :]  # question and parsed answer written under the image
    assert (band < 128).any() and (band == 255).mean() > 0.5
    # a coordinate off the image is no point: dropped, counted, and without points nothing is drawn
    rec = answer_record("o", blank, "Point.", '<point x="130.0" y="50.0" alt="dot">dot</point>', tmp_path)
    assert rec["points"] == [] and rec["points_outside"] == 1 and "drawn" not in rec
    assert "drawn" not in answer_record("n", blank, "Point.", "There are none.", tmp_path)
