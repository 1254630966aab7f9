"""Training on several images per sample (issue 25), through the real entry points.

- The shard reader gives a several-image sample's pages in order (docs/INTERFACES.md's schema:
  ``{key}.0.png``, ``{key}.1.png``, ... with the json's ``images`` list), skips and counts one with a
  corrupt page, and the packer places every sample whole: each packed row's ``<im_patch>`` tokens
  meet exactly the pooled features of the images of the samples in that row.
- ZeRO-3 on 2 processes through launch/train.sh on a mixture of one-image, three-image and
  text-only samples lowers the loss, and the run's model exports and answers a three-page prompt.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from test_train import _losses, _samples, _train_zero3

from data_tools.shards import ShardWriter
from mmsmall.data.shards import iter_samples

ROOT = Path(__file__).resolve().parent.parent
COLORS = [(220, 30, 30), (30, 180, 60), (40, 60, 220)]
NAMES = ["red", "green", "blue"]


def _page(i: int) -> bytes:
    w, h = 60 + 9 * (i % 5), 50 + 7 * (i % 4)
    im = Image.new("RGB", (w, h), (245, 245, 245))
    ImageDraw.Draw(im).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=COLORS[i % 3])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _conv(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _entry(page: bytes) -> dict:
    im = Image.open(io.BytesIO(page))
    return {"width": im.width, "height": im.height}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi")
    with ShardWriter(root / "docs", prefix="docs", max_count=16) as w:
        for i in range(32):
            if i % 2:  # three pages; the answer names the colour of the last one
                pages = [_page(3 * i + k) for k in range(3)]
                meta = {"id": f"d{i}", "task": "doc_qa", "images": [_entry(p) for p in pages],
                        "messages": _conv("What colour is the last page?", NAMES[(3 * i + 2) % 3])}  # fmt: skip
                w.write(f"d{i:03d}", pages, ["png"] * 3, meta)
            else:
                meta = {"id": f"o{i}", "task": "vqa", "messages": _conv("What colour is it?", NAMES[i % 3])}
                w.write(f"o{i:03d}", _page(i), "png", meta)
    text = root / "text"  # text-only samples: a json member and no image
    text.mkdir()
    with tarfile.open(text / "text-000000.tar", "w") as tar:
        for i in range(16):
            blob = json.dumps(
                {"id": f"t{i}", "task": "text", "messages": _conv(f"Say {NAMES[i % 3]}.", NAMES[i % 3])}
            )
            info = tarfile.TarInfo(f"t{i:03d}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob.encode()))
    return {"docs": root / "docs", "text": text}


def test_reader_gives_pages_in_order_and_counts_a_corrupt_page(data, tmp_path):
    samples = {s["key"]: s for s in iter_samples(data["docs"])}
    pages = samples["d001"]["image"]
    assert isinstance(pages, list) and len(pages) == 3
    want = [Image.open(io.BytesIO(_page(3 + k))).convert("RGB") for k in range(3)]
    assert [p.tobytes() for p in pages] == [p.tobytes() for p in want]
    assert isinstance(samples["o000"]["image"], Image.Image)
    # a page cut short: the sample is skipped and counted, its neighbours read
    bad = tmp_path / "bad"
    with ShardWriter(bad, prefix="bad", max_count=8) as w:
        for i in range(3):
            pages = [_page(k) for k in range(3)]
            if i == 1:
                pages[2] = pages[2][:40]
            w.write(
                f"b{i}", pages, ["png"] * 3, {"id": f"b{i}", "images": [{}] * 3, "messages": _conv("q", "a")}
            )
    counters: dict[str, int] = {}
    assert [s["key"] for s in iter_samples(bad, counters=counters)] == ["b0", "b2"]
    assert counters == {"bad_image": 1}


def test_packed_rows_never_split_a_samples_images(data):
    from mmsmall.config import ModelConfig, load_config
    from mmsmall.data.packing import Packer
    from mmsmall.processing.processor import Processor
    from mmsmall.processing.tokenizer import build_tokenizer, special_ids

    cfg = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    tok = build_tokenizer(cfg.tokenizer)
    proc = Processor(tok, cfg.image)
    examples = [
        proc.encode(s["image"], [s["json"]["messages"]], sample_id=s["key"])
        for s in iter_samples(data["docs"])
    ]
    examples += [proc.encode(None, [_conv("Say red.", "red")], sample_id=f"t{i}") for i in range(6)]
    it = itertools.cycle(examples)
    packer = Packer(seq_len=1024, rows=2, pad_id=tok.pad_token_id)
    patch = special_ids(tok)["<im_patch>"]
    for _ in range(6):
        batch = packer.next_batch(lambda: next(it))
        # the pooled features of a row's images meet that row's <im_patch> tokens, in order
        n_tokens = int((batch["input_ids"] == patch).sum())
        n_features = 0 if batch["image_token_pooling"] is None else batch["image_token_pooling"].shape[0]
        assert n_tokens == n_features
        per_row = (batch["input_ids"] == patch).sum(dim=1).tolist()
        by_id = {ex["sample_id"]: ex for ex in examples}
        for r, ids in enumerate(_row_ids(batch)):
            assert per_row[r] == sum(int((by_id[i]["input_ids"] == patch).sum()) for i in ids)
        grids = batch["image_grids"]  # one row per image, every image of every placed sample
        assert grids.shape[0] == sum(len(by_id[i].get("image_grids", [])) for i in batch["sample_ids"])


def _row_ids(batch: dict) -> list[list[str]]:
    """The sample ids of each row (collate lists them row by row, documents in order)."""
    counts = [
        int(batch["doc_ids"][r].max()) + 1 if (batch["doc_ids"][r] >= 0).any() else 0
        for r in range(len(batch["doc_ids"]))
    ]
    ids, out = list(batch["sample_ids"]), []
    for c in counts:
        out.append(ids[:c])
        ids = ids[c:]
    return out


@pytest.mark.slow
def test_zero3_two_processes_on_one_three_and_no_image_samples_lower_the_loss_and_export(data, tmp_path):
    from mmsmall.export import run_export
    from mmsmall.inference.predictor import Predictor

    out = tmp_path / "z3"
    mixture = f"data.train=[{{path: {data['docs']}, rate: 3}}, {{path: {data['text']}, rate: 1}}]"
    _train_zero3(
        out, data["docs"], mixture, "train.steps=12", "data.seq_len=1024", "train.micro_batch_size=2"
    )
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 13))
    assert sum(losses[s] for s in (10, 11, 12)) / 3 < losses[1] - 0.3, losses
    trained = {i for rank in (0, 1) for ids in _samples(out, rank).values() for i in ids}
    assert {i[0] for i in trained} == {"d", "o", "t"}  # three-page, one-image and text-only samples
    release = run_export(str(out), str(tmp_path / "release"))
    pages = [Image.open(io.BytesIO(_page(k))) for k in range(3)]
    answer = Predictor(str(release)).predict([pages], ["What colour is the last page?"], max_new_tokens=4)
    assert len(answer) == 1 and isinstance(answer[0], str)
