"""The data workers decode: the stream hands them image bytes, they return encoded examples.

With ``data.num_workers=2`` the trainer process opens no image at all, yet the batches, the
counted corrupt image (toy007 of test_train's shards) and the saved position equal the in-process
path's; a position saved with samples drawn ahead resumes to the same next batches.
"""

from __future__ import annotations

import pytest
import torch
from test_train import shards  # noqa: F401 - the module's shard fixture

import mmsmall.data.loader as loader


def _data(shards, workers: int, *more: str):  # noqa: F811
    from mmsmall.config import load_config
    from mmsmall.processing.processor import Processor
    from mmsmall.processing.tokenizer import build_tokenizer

    cfg = load_config(
        "configs/train/tiny-pretrain.yaml",
        [f"data.train=[{{path: {shards}}}]", f"data.num_workers={workers}", *more],
    )
    tok = build_tokenizer(cfg.model.tokenizer)
    proc = Processor(tok, cfg.model.image, max_length=cfg.data.seq_len)
    return loader.TrainData(cfg, proc, tok.pad_token_id)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_workers_decode_and_give_the_in_process_batches(shards, monkeypatch):  # noqa: F811
    opened = []
    real = loader.open_image
    monkeypatch.setattr(loader, "open_image", lambda data: opened.append(1) or real(data))
    inline, pooled = _data(shards, 0), _data(shards, 2)
    try:
        want = [inline.next_batch() for _ in range(14)]  # > 48 samples: the corrupt one is drawn
        assert len(opened) > 48 and inline.counters.get("bad_image", 0) >= 1
        opened.clear()
        got = [pooled.next_batch() for _ in range(14)]
        assert not opened  # every image was opened in a worker process
        assert all(_same(a, b) for a, b in zip(want, got))
        assert pooled.counters == inline.counters
        # a position saved while samples are drawn ahead resumes to the same batches
        state = pooled.state_dict()
        assert state["stream"] != pooled.stream.state_dict()  # the read-ahead is not in the position
        after = [pooled.next_batch() for _ in range(3)]
        again = _data(shards, 1)
        again.load_state_dict(state)
        assert all(_same(a, b) for a, b in zip(after, [again.next_batch() for _ in range(3)]))
        again.close()
    finally:
        pooled.close()


def test_worker_batches_hold_the_processors_float_pixels(shards):  # noqa: F811
    """Workers send uint8 crops and the trainer normalizes the batch (TrainData.next_batch): its
    pixel_values are bit for bit those of the Processor's float32 default, packed the same way."""
    ref, pooled = _data(shards, 0), _data(shards, 2)
    ref.maker = loader.ExampleMaker(ref.processor, *ref.maker.args[:3], pixel_bytes=False)
    try:
        for _ in range(6):
            want = ref.packer.next_batch(ref._pull)  # the packed batch of float32 examples
            got = pooled.next_batch()
            assert want["sample_ids"] == got["sample_ids"]
            assert want["pixel_values"].dtype == got["pixel_values"].dtype == torch.float32
            assert torch.equal(want["pixel_values"].view(torch.int32), got["pixel_values"].view(torch.int32))
    finally:
        ref.close()
        pooled.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_data_stops_in_the_one_place(tmp_path, workers):
    """Shards whose every member is unreadable (here: no json) stop with the same NoUsableData as
    data that is all too long, whether or not workers encode."""
    import tarfile

    d = tmp_path / "bad"
    d.mkdir()
    with tarfile.open(d / "bad-000000.tar", "w") as t:
        for i in range(3):
            info = tarfile.TarInfo(f"s{i}.txt")
            info.size = 2
            t.addfile(info, __import__("io").BytesIO(b"hi"))
    data = _data(d, workers)
    try:
        with pytest.raises(loader.NoUsableData, match=r"whole pass over data.train"):
            data.next_batch()
    finally:
        data.close()
