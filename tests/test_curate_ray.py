"""The Ray executor on a running Ray cluster gives the same shards as the local executor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ray_head import ray_head, run_driver

from data_tools.curate import run_curation
from data_tools.fixtures import build_curation_fixture

ray = pytest.importorskip("ray", reason="Ray is the `distributed` extra: pip install 'mmsmall[distributed]'")


@pytest.mark.slow
def test_curate_against_a_running_ray_cluster_matches_local(tmp_path):
    """`ray start --head` (2 CPUs, 127.0.0.1), then `mmsmall curate --executor ray --workers 2` with
    RAY_ADDRESS: byte-identical shards to the local executor (tests/ray_head.py starts and stops the head)."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    cfg, _ = build_curation_fixture(tmp_path / "data", n_good=4)
    cfg |= {"report": {"enabled": False}, "unit_size": 3}
    local = run_curation({**cfg, "out_dir": str(tmp_path / "local")}, workers=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "out_dir": str(tmp_path / "ray")}))
    with ray_head(root) as env:
        cmd = [sys.executable, "-m", "mmsmall.cli", "curate", str(tmp_path / "cfg.yaml"), "--executor", "ray",
               "--workers", "2"]  # fmt: skip
        summary = json.loads(run_driver(cmd, env, root).stdout)
    assert summary["n_in"] == local["n_in"] and summary["dropped"] == local["dropped"]
    tars = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").glob("*.tar"))}
    assert tars and tars == {p.name: p.read_bytes() for p in sorted((tmp_path / "ray").glob("*.tar"))}
