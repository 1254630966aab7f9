"""Restarts resume from the newest *verified* checkpoint, never overwrite an earlier run's, and
refuse a config change that a resume would silently ignore."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmsmall.config import ConfigError, load_config
from mmsmall.export.intact import find_resume, write_complete
from mmsmall.train.resume import check_resume_config

ROOT = Path(__file__).resolve().parent.parent


def _fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"w" * 100)
    (d / "client_rank00000.pt").write_bytes(b"c" * 10)
    (d / "config.yaml").write_text("name: run\n")
    if complete:
        write_complete(d, 1)
    return d


@pytest.mark.parametrize("latest", [None, "", "step_00000099", "step_00000030"])
def test_newest_intact_checkpoint_is_found_whatever_latest_says(tmp_path, latest):
    for s in (10, 20):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 30, complete=False)  # a save killed midway
    if latest is not None:
        (tmp_path / "latest").write_text(latest)
    point = find_resume(tmp_path)
    assert point.tag == "step_00000020"
    assert any("step_00000030 skipped: its save did not finish" in n for n in point.notes)
    if latest is None:
        assert "checkpoints/latest is missing" in point.notes
    elif latest != "step_00000030":
        assert any(f"latest names {latest!r}" in n for n in point.notes)  # not blamed on the world size


def test_damaged_newest_checkpoint_falls_back_and_says_why(tmp_path):
    _fake_ckpt(tmp_path, 10)
    d = _fake_ckpt(tmp_path, 20)
    (tmp_path / "latest").write_text("step_00000020")
    (d / "mp_rank_00_model_states.pt").write_bytes(b"w" * 40)  # truncated
    point = find_resume(tmp_path)
    assert point.tag == "step_00000010"
    assert "step_00000020 skipped: mp_rank_00_model_states.pt has 40 bytes, 100 when saved" in point.notes
    (tmp_path / "step_00000010" / "client_rank00000.pt").unlink()
    assert find_resume(tmp_path).tag is None


def test_changed_hyperparameter_is_refused_by_name_and_run_keys_are_applied(tmp_path):
    cfg = load_config(ROOT / "configs/train/tiny-pretrain.yaml")
    d = tmp_path / "step_00000010"
    d.mkdir()
    from mmsmall.config import save_config

    save_config(cfg, d / "config.yaml")
    assert check_resume_config(cfg, d) == []
    longer = load_config(ROOT / "configs/train/tiny-pretrain.yaml", ["train.steps=500", "train.log_every=7"])
    assert check_resume_config(longer, d) == [
        "train.log_every: 1 -> 7",
        f"train.steps: {cfg.train.steps} -> 500",
    ]
    changed = load_config(ROOT / "configs/train/tiny-pretrain.yaml", ["train.lr.llm=0.05", "seed=3"])
    with pytest.raises(ConfigError, match=r"changed seed=3 \(checkpoint: 0\), train\.lr\.llm=0\.05"):
        check_resume_config(changed, d)


def test_grad_accum_may_change_with_the_world_size_only_when_the_global_batch_stays(tmp_path):
    from mmsmall.config import save_config

    cfg = load_config(ROOT / "configs/train/tiny-pretrain.yaml", ["train.grad_accum=1"])
    d = tmp_path / "step_00000010"
    d.mkdir()
    save_config(cfg, d / "config.yaml")
    write_complete(d, 2)  # saved by 2 processes
    doubled = load_config(ROOT / "configs/train/tiny-pretrain.yaml", ["train.grad_accum=2"])
    assert check_resume_config(doubled, d, world_size=1) == ["train.grad_accum: 1 -> 2"]
    with pytest.raises(ConfigError, match=r"train\.grad_accum=2"):  # 2 x 2 != 1 x 2: another batch
        check_resume_config(doubled, d, world_size=2)
