"""The Ray executor (local instance, one CPU) gives the same shards as the local executor."""

from __future__ import annotations

import pytest

from data_tools.curate import run_curation
from data_tools.fixtures import build_curation_fixture

ray = pytest.importorskip("ray", reason="Ray is the `distributed` extra: pip install 'mmsmall[distributed]'")


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path):
    cfg, expected = build_curation_fixture(tmp_path / "data", n_good=4)
    cfg["report"] = {"enabled": False}
    local = run_curation({**cfg, "out_dir": str(tmp_path / "local")}, workers=1)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_curation({**cfg, "out_dir": str(tmp_path / "ray")}, executor="ray", workers=1)
    finally:
        ray.shutdown()
    assert remote["n_in"] == local["n_in"] == expected["n_in"]
    assert remote["dropped"] == local["dropped"] and remote["n_kept"] == local["n_kept"]
    tars = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").glob("*.tar"))}
    assert tars and tars == {p.name: p.read_bytes() for p in sorted((tmp_path / "ray").glob("*.tar"))}
