"""Curation end to end on a fixture holding every bad input, plus dedup/decontam/config units."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_tools.config import load_curate_config
from data_tools.curate import run_curation
from data_tools.decontam import load_benchmark
from data_tools.dedup import NearDupIndex, greedy_keep, hamming, phash
from data_tools.fixtures import build_curation_fixture, encode, natural_image, near_copies, write_jsonl
from mmsmall.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _samples(out: Path) -> dict[str, tuple[str, dict, bytes]]:
    """key -> (ext, json, image bytes) over every shard of a curated folder (read in memory)."""
    out_samples: dict[str, dict] = {}
    for t in sorted(out.glob("*.tar")):
        with tarfile.open(t) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                out_samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return {
        k: (next(e for e in v if e != "json"), json.loads(v["json"]), v[next(e for e in v if e != "json")])
        for k, v in out_samples.items()
    }


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    cfg, expected = build_curation_fixture(root)
    summary = run_curation(cfg, workers=1)
    return root, cfg, expected, summary


def test_conservation_every_bad_input_has_its_reason(curated):
    _, _, expected, summary = curated
    assert summary["n_in"] == expected["n_in"]
    assert summary["n_in"] == summary["n_kept"] + sum(summary["dropped"].values())
    assert summary["dropped"] == expected["dropped"]
    assert summary["n_kept"] == expected["n_kept"]
    manifest = json.loads(Path(summary["manifest"]).read_text())
    assert manifest["total"] == summary["n_kept"] == sum(s["count"] for s in manifest["shards"])


def test_shards_follow_the_schema(curated):
    root, _, expected, summary = curated
    samples = _samples(Path(summary["out_dir"]))
    assert len(samples) == expected["n_kept"]
    for key, (ext, meta, data) in samples.items():
        assert "." not in key and "/" not in key
        im = Image.open(io.BytesIO(data))
        assert im.mode == "RGB" and ext in ("jpg", "png")
        assert (meta["image"]["width"], meta["image"]["height"]) == im.size
        assert len(meta["image"]["phash"]) == 16 and len(meta["image"]["sha256"]) == 64
        assert meta["messages"] and isinstance(meta["points"], list)
    rotated = samples["raw_rotated"][1]["image"]
    assert (rotated["width"], rotated["height"]) == (120, 200)  # EXIF orientation applied
    assert samples["raw_rgba"][0] == "png"


def test_hostile_member_names_stay_inside(curated):
    root, _, _, summary = curated
    out = Path(summary["out_dir"]).resolve()
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out)
    assert not list(root.parent.glob("evil*")) and not list(root.glob("evil*"))
    assert not Path("/abs/path/x.jpg").exists()
    keys = set(_samples(out))
    assert {"wds____evil", "wds__abs_path_x", "wds_ok_a"} <= keys  # kept under sanitized keys


def test_near_duplicates_found_and_distinct_kept(curated):
    _, _, expected, summary = curated
    samples = _samples(Path(summary["out_dir"]))
    ids = {meta["id"] for _, meta, _ in samples.values()}
    assert set(expected["good_ids"]) <= ids  # distinct images all kept
    assert not ids & {"near_q60", "near_half", "near_crop3"}
    assert summary["dropped"]["near_duplicate"] == 3


def test_planted_benchmark_items_removed_and_reported(curated):
    _, _, expected, summary = curated
    ids = {meta["id"] for _, meta, _ in _samples(Path(summary["out_dir"])).values()}
    assert expected["planted_image_id"] not in ids and expected["planted_question_id"] not in ids
    html = Path(summary["report"]).read_text()
    assert "test_human:human_test/00000" in html and "val_v1.0:7" in html
    assert "<th>items indexed</th>" in html and summary["decontam_benchmarks"]["test_human"]["images"] == 1
    assert summary["decontam_hits"] == 2


def test_points_normalized_and_negatives_kept(curated):
    _, _, _, summary = curated
    pts = [meta for _, meta, _ in _samples(Path(summary["out_dir"])).values() if meta["task"] == "pointing"]
    assert len(pts) == 1
    by_label = {p["label"]: p["xy"] for p in pts[0]["points"]}
    assert by_label["cat"] == []  # negative kept
    assert np.allclose(by_label["mug"], [[100 / 320, 50 / 240]], atol=1e-5)
    assert "There are none." in json.dumps(pts[0]["messages"])


def test_rerun_skips_everything(curated):
    _, cfg, _, summary = curated
    before = {p.name: p.read_bytes() for p in Path(summary["out_dir"]).glob("*.tar")}
    again = run_curation(cfg, workers=1)
    assert again["units_resumed"] == again["units"]
    assert {p.name: p.read_bytes() for p in Path(summary["out_dir"]).glob("*.tar")} == before


def test_config_typo_names_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match="max_distance"):
        load_curate_config({"inputs": [{"path": "x"}], "dedup": {"max_distanse": 3}})
    with pytest.raises(ConfigError, match="min_side"):
        load_curate_config({"inputs": [{"path": "x"}]}, ["validate.min_sid=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [{path: x, kind: folder}]\nshard_sise: 10\n")
    with pytest.raises(ConfigError, match="shard_size"):
        load_curate_config(bad)
    with pytest.raises(ConfigError, match="valid: folder"):
        load_curate_config({"inputs": [{"path": "x", "kind": "zip"}]})


def test_repo_configs_load():
    for name in ("example.yaml", "demo.yaml"):
        cfg = load_curate_config(ROOT / "configs" / "curate" / name)
        assert cfg.inputs


def test_near_dup_index_matches_brute_force():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, size=3000, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    for a, b, bits in ((5, 100, 3), (5, 200, 4), (7, 300, 5), (9, 400, 0)):
        flips = rng.choice(64, size=bits, replace=False)
        h[b] = h[a] ^ np.uint64(sum(1 << int(f) for f in flips))
    d = hamming(h[:, None], h[None, :])  # (N, N) brute force
    for k in (4, 10):  # k=4: binary-searched packed keys; k=10: 11-bit keys, dense bucket offsets
        ii, jj = np.nonzero(np.triu(d <= k, 1))
        idx = NearDupIndex(h, k)
        assert all((t.offsets is not None) == (k == 10) for t in idx.tables)
        a, b = idx.self_pairs()
        assert sorted(zip(a.tolist(), b.tolist())) == sorted(zip(ii.tolist(), jj.tolist()))
        q, i, _ = idx.query(h[:50])
        qq, ii2 = np.nonzero(d[:50] <= k)
        assert sorted(zip(q.tolist(), i.tolist())) == sorted(zip(qq.tolist(), ii2.tolist()))
    a, b = NearDupIndex(h, 4).self_pairs()
    assert {(5, 100), (5, 200), (9, 400)} <= set(zip(a.tolist(), b.tolist()))
    q, i, dist = NearDupIndex(h, 4, bands=5).query(h[[5, 7]])
    assert set(zip(q.tolist(), i.tolist())) == {(0, 5), (0, 100), (0, 200), (1, 7)}
    keep, dup_of = greedy_keep(len(h), a, b)
    assert not keep[100] and dup_of[100] == 5 and keep[5] and keep[7] and keep[300]


def test_phash_near_copies_close_distinct_far():
    ims = [natural_image(s) for s in range(8)]
    hs = np.array([phash(im) for im in ims], dtype=np.uint64)
    d = hamming(hs[:, None], hs[None, :]) + 64 * np.eye(8, dtype=np.int64)
    assert d.min() > 12
    for im, h in zip(ims, hs.tolist()):
        for data in near_copies(im).values():
            assert bin(h ^ phash(Image.open(io.BytesIO(data)))).count("1") <= 8


def test_parquet_input_and_parquet_benchmark(tmp_path):
    bench_img = natural_image(7)
    imgs = [encode(natural_image(s)) for s in (1, 2)] + [encode(bench_img, quality=80)]
    pq.write_table(
        pa.table(
            {
                "image": [{"bytes": b, "path": None} for b in imgs],
                "caption": ["one cat", "two dogs", "a chart"],
            }
        ),
        tmp_path / "in.parquet",
    )
    bench = tmp_path / "bench"
    bench.mkdir()
    pq.write_table(
        pa.table(
            {"image": [{"bytes": encode(bench_img, "PNG"), "path": "x.png"}], "question": ["How many bars?"]}
        ),
        bench / "test-00000.parquet",
    )
    items = load_benchmark(bench)
    assert items[0]["question"] == "How many bars?" and items[0]["image_bytes"]
    summary = run_curation(
        {"inputs": [{"kind": "parquet", "path": str(tmp_path / "in.parquet")}], "out_dir": str(tmp_path / "out"),
         "decontam": {"benchmarks": [{"path": str(bench)}]}, "report": {"enabled": False}},
        workers=1,
    )  # fmt: skip
    assert summary["n_kept"] == 2 and summary["dropped"] == {"decontam_image": 1}


def test_clip_scores_stored_and_quantile_threshold(tmp_path):
    rows = [{"image": f"{i}.jpg", "caption": f"picture {i} of shapes"} for i in range(10)]
    for i in range(10):
        (tmp_path / f"{i}.jpg").write_bytes(encode(natural_image(200 + i)))
    write_jsonl(tmp_path / "c.jsonl", rows)
    from data_tools.clipscore import TINY_CLIP

    summary = run_curation(
        {"inputs": [{"kind": "jsonl", "path": str(tmp_path / "c.jsonl")}], "out_dir": str(tmp_path / "out"),
         "clip": {"enabled": True, "model": "mmsmall-tiny-clip", "custom": TINY_CLIP, "quantile": 0.3}},
        workers=1,
    )  # fmt: skip
    scores = [meta["meta"]["clip_score"] for _, meta, _ in _samples(tmp_path / "out").values()]
    assert summary["dropped"] == {"clip_low": 3} and len(scores) == 7
    assert min(scores) >= summary["clip_threshold"]
    assert "threshold" in Path(summary["report"]).read_text()


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.mark.slow
def test_kill_and_resume_is_byte_identical(tmp_path):
    # a webdataset input of 4 tars = 4 work units
    wds = tmp_path / "wds"
    wds.mkdir()
    for t in range(4):
        with tarfile.open(wds / f"in-{t:06d}.tar", "w") as tar:
            for j in range(6):
                key, n = f"s{t}_{j}", 300 + 10 * t + j
                meta = {"id": key, "messages": [{"role": "user", "content": "Describe this image."},
                                                {"role": "assistant", "content": f"scene {n} with shapes"}]}  # fmt: skip
                for name, data in (
                    (f"{key}.jpg", encode(natural_image(n))),
                    (f"{key}.json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    base = {"inputs": [{"kind": "wds", "path": str(wds)}], "shard_size": 5, "report": {"enabled": False}}
    base["inputs"][0]["kind"] = "webdataset"
    ref = run_curation({**base, "out_dir": str(tmp_path / "ref")}, workers=1)
    assert ref["n_kept"] == 24

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(json.dumps({**base, "out_dir": str(tmp_path / "run")}))
    cmd = [sys.executable, "-m", "data_tools", "curate", str(cfg_path), "--workers", "1"]
    env = {**os.environ, "DATA_TOOLS_UNIT_DELAY_S": "2"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "run" / "_work" / "units" / "u000000.done.json"
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list((tmp_path / "run" / "_work" / "units").glob("*.done.json"))
    assert 1 <= len(done) < 4, "the kill must land mid-run"
    assert not list((tmp_path / "run").glob("*.tar"))

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _tars(tmp_path / "run") == _tars(tmp_path / "ref")
    out = json.loads(rerun.stdout)
    assert out["n_kept"] == 24 and out["units_resumed"] == len(done)  # finished units were not redone
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["shards"] == json.loads((tmp_path / "ref" / "manifest.json").read_text())["shards"]


def test_csv_captions_sidecar_text_and_missing_datasets(tmp_path):
    (tmp_path / "a.jpg").write_bytes(encode(natural_image(500)))
    (tmp_path / "b.png").write_bytes(encode(natural_image(501), "PNG"))
    (tmp_path / "caps.csv").write_text(
        "image,caption,id\na.jpg,a scene of shapes,first\nb.png,another scene,second\n"
    )
    summary = run_curation(
        {"inputs": [{"kind": "csv", "path": str(tmp_path / "caps.csv")}], "out_dir": str(tmp_path / "o1"),
         "report": {"enabled": False}},
        workers=1,
    )  # fmt: skip
    assert summary["n_kept"] == 2 and {m["id"] for _, m, _ in _samples(tmp_path / "o1").values()} == {
        "first",
        "second",
    }
    (tmp_path / "a.txt").write_text("a sidecar caption")
    summary = run_curation(
        {"inputs": [{"kind": "folder", "path": str(tmp_path)}], "out_dir": str(tmp_path / "o2"),
         "report": {"enabled": False}},
        workers=1,
    )  # fmt: skip
    assert summary["n_kept"] == 1 and summary["dropped"] == {"text_empty": 1}  # b.png has no caption
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="datasets"):
            run_curation({"inputs": [{"kind": "hf", "path": str(tmp_path)}], "out_dir": str(tmp_path / "o3")})


@pytest.mark.slow
def test_process_pool_matches_single_process(tmp_path):
    cfg, _ = build_curation_fixture(tmp_path / "data", n_good=4)
    cfg["report"] = {"enabled": False}
    one = run_curation({**cfg, "out_dir": str(tmp_path / "one")}, workers=1)
    two = run_curation({**cfg, "out_dir": str(tmp_path / "two"), "keep_work": False}, workers=2)
    assert one["dropped"] == two["dropped"] and one["n_kept"] == two["n_kept"]
    assert _tars(tmp_path / "one") == _tars(tmp_path / "two")
    assert not (tmp_path / "two" / "_work").exists()


def test_parquet_rows_across_row_groups(tmp_path):
    from data_tools.ingest import _parquet_rows

    pq.write_table(pa.table({"i": list(range(25))}), tmp_path / "t.parquet", row_group_size=10)
    assert [r["i"] for r in _parquet_rows(str(tmp_path / "t.parquet"), 7, 23)] == list(range(7, 23))


def test_cli_typo_exits_with_valid_keys(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("inputs: [{kind: folder, path: x}]\n")
    r = subprocess.run([sys.executable, "-m", "data_tools", "curate", str(cfg), "dedup.near_distance=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "dedup.near_distance" in r.stderr and "max_distance" in r.stderr


def test_text_filters_and_language_switch():
    from data_tools.config import TextConfig
    from data_tools.textfilters import language_id_available, text_filter

    def msgs(answer: str) -> list[dict]:
        return [{"role": "user", "content": "Describe this image."}, {"role": "assistant", "content": answer}]

    cfg = TextConfig(min_words=2, max_words=20, max_chars=120)
    assert text_filter(msgs("a red bus on a street"), cfg) == (None, "")
    assert text_filter(msgs("bus"), cfg)[0] == "text_few_words"
    assert text_filter(msgs("word " * 30), cfg)[0] == "text_long"  # 150 chars > 120
    assert text_filter(msgs("a b c d e f g h i j k l m n o p q r s t u v"), cfg)[0] == "text_many_words"
    assert text_filter(msgs("the cat sat " * 5), cfg)[0] == "text_repetitive"
    assert text_filter(msgs("Lorem ipsum dolor sit amet"), cfg)[0] == "text_boilerplate"
    lang = TextConfig(languages=["en"])
    reason, _ = text_filter(msgs("der Hund läuft schnell über die große grüne Wiese"), lang)
    assert reason == ("text_language" if language_id_available() else None)  # skipped without langid


def test_clip_absolute_threshold_in_the_global_pass():
    from data_tools.config import CurateConfig
    from data_tools.curate import reduce_decisions

    cands = [{"pos": i, "id": f"s{i}", "source": "x", "text": "", "sha256": f"{i:064x}",
              "phash": f"{(i * 0x9E3779B97F4A7C15) % 2**64:016x}", "clip": c}
             for i, c in enumerate([0.1, 0.3, 0.25, 0.05])]  # fmt: skip
    cfg = CurateConfig()
    cfg.clip.enabled, cfg.clip.threshold = True, 0.2
    dec = reduce_decisions([{"uid": "u000000", "cands": cands}], cfg)
    assert dec["clip_threshold"] == 0.2
    assert [k for _, _, k in dec["kept"]] == ["x_s1", "x_s2"]
    assert sorted(d["id"] for d in dec["drops"] if d["reason"] == "clip_low") == ["s0", "s3"]


def test_partitioned_run_writes_the_bytes_of_the_in_driver_reference(curated, tmp_path):
    """run_curation (global pass and shards as tasks) == reduce_decisions + write_shards on the same units."""
    from data_tools.curate import _absolute_paths, config_fingerprint, reduce_decisions, write_shards

    _, cfg, _, summary = curated
    work = tmp_path / "w"
    run_cfg = {**cfg, "shard_size": 7, "out_dir": str(tmp_path / "tasks"), "work_dir": str(work)}
    two = run_curation(run_cfg, workers=2)
    cfg = _absolute_paths(load_curate_config(run_cfg))
    stats = [json.loads(p.read_text()) for p in sorted((work / "units").glob("u*.done.json"))]
    dec = reduce_decisions(stats, cfg)
    assert two["n_kept"] == len(dec["kept"]) == summary["n_kept"]
    (work / "shards").rename(work / "shards_tasks")  # the reference must write, not reuse the markers
    ref = tmp_path / "ref"
    entries = write_shards(dec["kept"], cfg, work, ref, config_fingerprint(cfg))
    assert len(entries) == len(list((tmp_path / "tasks").glob("*.tar"))) >= 2
    for e in entries:
        assert (ref / e["name"]).read_bytes() == (tmp_path / "tasks" / e["name"]).read_bytes()
