"""The image URL stage against a local HTTP server: every bad case has its reason, good images are
kept, a killed run resumes without refetching, and --retry-failed fetches only the failures."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.curate import run_curation
from data_tools.download import DownloadConfig, download
from data_tools.fixtures import encode, natural_image, write_jsonl
from data_tools.httpfixture import LocalServer, Route

ROOT = Path(__file__).resolve().parent.parent
CAP = 60_000


def _jpg(seed: int) -> bytes:
    return encode(natural_image(seed, (96, 72)), "JPEG")


def _routes() -> dict[str, Route]:
    big = b"\xff" * (CAP * 2)
    return {
        "/good.jpg": Route(_jpg(1)),
        "/good.png": Route(encode(natural_image(2, (96, 72)), "PNG"), "image/png"),
        "/moved": Route(redirect="/target.jpg"),
        "/target.jpg": Route(_jpg(3)),
        "/flaky.jpg": Route(_jpg(4), fail_first=1),
        "/sha_ok.jpg": Route(_jpg(5)),
        "/stall.jpg": Route(_jpg(6), stall_s=3.0),
        "/page.html": Route(b"<html>hello</html>", "text/html"),
        "/big.jpg": Route(big),
        "/big_nolength.jpg": Route(big, send_length=False),
        "/sha_bad.jpg": Route(_jpg(7)),
        "/garbage.jpg": Route(b"this is not a jpeg at all"),
        "/loop": Route(redirect="/loop"),
        "/gone.jpg": Route(status=410),
        "/err.jpg": Route(status=500),
        "/short.jpg": Route(_jpg(12), cut_after=300, fail_first=99),  # closes before its Content-Length
        # good images under the types real hosts send: S3's default, the generic one, none at all
        "/s3.jpg": Route(_jpg(9), "binary/octet-stream"),
        "/octet.jpg": Route(_jpg(10), "application/octet-stream"),
        "/untyped.jpg": Route(_jpg(11), None),
    }


EXPECTED = {
    "/good.jpg": "ok", "/good.png": "ok", "/moved": "ok", "/flaky.jpg": "ok", "/sha_ok.jpg": "ok",
    "/missing.jpg": "fetch_http_404", "/gone.jpg": "fetch_http_410", "/stall.jpg": "fetch_timeout",
    "/page.html": "fetch_not_image", "/big.jpg": "fetch_too_large", "/big_nolength.jpg": "fetch_too_large",
    "/sha_bad.jpg": "fetch_sha256_mismatch", "/garbage.jpg": "fetch_undecodable",
    "/loop": "fetch_too_many_redirects", "/err.jpg": "fetch_http_500", "/short.jpg": "fetch_truncated",
    "/s3.jpg": "ok", "/octet.jpg": "ok", "/untyped.jpg": "ok",
}  # fmt: skip


def _rows(srv: LocalServer, paths) -> list[dict]:
    sha = {"/sha_ok.jpg": hashlib.sha256(_jpg(5)).hexdigest(), "/sha_bad.jpg": "0" * 64}
    return [
        {"url": srv.url(p), "caption": f"picture of thing {i}", "sha256": sha.get(p)}
        for i, p in enumerate(paths)
    ]


def _cfg(**kw) -> DownloadConfig:
    base = dict(concurrency=8, per_host=4, read_timeout_s=1.0, connect_timeout_s=2.0, retries=1,
                backoff_s=0.05, max_bytes=CAP)  # fmt: skip
    return DownloadConfig(**{**base, **kw})


def _reasons(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    return {"/" + r["url"].split("/", 3)[3]: r.get("_error", "ok") for r in rows}


def test_every_failure_has_its_reason_and_good_images_are_kept(tmp_path):
    routes = _routes()
    with LocalServer(routes) as srv:
        rows = _rows(srv, list(EXPECTED))
        write_jsonl(tmp_path / "rows.jsonl", rows)
        report = download(tmp_path / "rows.jsonl", tmp_path / "dl", _cfg(output="files"))
        assert _reasons(tmp_path / "dl") == EXPECTED
        assert report["n_ok"] == 8 and report["failed"]["fetch_too_large"] == 2
        assert srv.hits["/flaky.jpg"] == 2 and srv.hits["/stall.jpg"] == 2  # retried once
        assert srv.hits["/err.jpg"] == 2 and srv.hits["/short.jpg"] == 2
        log = [json.loads(x) for x in (tmp_path / "dl" / "fetch_log.jsonl").read_text().splitlines()]
        types = {"/" + f["url"].split("/", 3)[3]: f["content_type"] for f in log}
        assert [types[p] for p in ("/s3.jpg", "/octet.jpg", "/untyped.jpg", "/page.html")] == [
            "binary/octet-stream", "application/octet-stream", "", "text/html"]  # fmt: skip
        assert srv.hits["/missing.jpg"] == 1 and srv.hits["/page.html"] == 1  # not retried
        kept = [json.loads(x) for x in (tmp_path / "dl" / "images.jsonl").read_text().splitlines()]
        files = {
            r["url"].rsplit("/", 1)[1]: (tmp_path / "dl" / r["image"]).read_bytes()
            for r in kept
            if "image" in r
        }
        assert files["good.jpg"] == routes["/good.jpg"].body and files["moved"] == routes["/target.jpg"].body

        # a rerun fetches nothing; --retry-failed fetches exactly the failures
        before = dict(srv.hits)
        assert download(tmp_path / "rows.jsonl", tmp_path / "dl", _cfg(output="files"))["fetched_now"] == 0
        assert dict(srv.hits) == before
        routes["/missing.jpg"] = Route(_jpg(8))  # the server gets the file meanwhile
        download(tmp_path / "rows.jsonl", tmp_path / "dl", _cfg(output="files"), retry_failed=True)
        for path, reason in EXPECTED.items():
            if reason == "ok":
                assert srv.hits[path] == before.get(path, 0), path
            elif path != "/loop":  # a redirect loop is several requests per attempt
                assert srv.hits[path] > before[path], path
        assert _reasons(tmp_path / "dl")["/missing.jpg"] == "ok"

    # the failures reach curation's funnel under their reasons; good images become samples
    summary = run_curation(
        {"inputs": [{"kind": "jsonl", "path": str(tmp_path / "dl" / "images.jsonl"), "text_field": "caption"}],
         "out_dir": str(tmp_path / "cur"), "dedup": {"near": False}},
        workers=1,
    )  # fmt: skip
    assert summary["n_kept"] == 9
    dropped = dict(summary["dropped"])
    assert dropped.pop("fetch_too_large") == 2 and "fetch_http_404" not in dropped
    assert dropped == {
        r: 1 for p, r in EXPECTED.items() if r not in ("ok", "fetch_too_large", "fetch_http_404")
    }
    assert "fetch_sha256_mismatch" in (tmp_path / "cur" / "report" / "report.html").read_text()


def test_drip_feeding_host_times_out_and_the_run_ends_within_its_bound(tmp_path):
    """A host that sends one byte every 0.2 s never trips the read timeout; the deadline per
    attempt ends it, so the whole run is bounded by (retries + 1) x deadline plus backoff."""
    routes = {"/drip.jpg": Route(_jpg(40), drip_s=0.2), "/fine.jpg": Route(_jpg(41))}
    with LocalServer(routes) as srv:
        write_jsonl(tmp_path / "rows.jsonl", _rows(srv, list(routes)))
        t0 = time.monotonic()
        report = download(tmp_path / "rows.jsonl", tmp_path / "dl", _cfg(deadline_s=1.0, retries=1))
        took = time.monotonic() - t0
    assert report["n_ok"] == 1 and report["failed"] == {"fetch_timeout": 1}
    assert took < 2 * 1.0 + 3.0, (
        f"the run took {took:.1f} s; the drip body alone takes {len(_jpg(40)) * 0.2:.0f} s"
    )


@pytest.mark.slow
def test_killed_download_resumes_without_refetching(tmp_path):
    routes = {f"/img{i}.jpg": Route(_jpg(20 + i)) for i in range(12)}
    with LocalServer(routes, latency_s=0.25) as srv:
        write_jsonl(tmp_path / "rows.jsonl", _rows(srv, list(routes)))
        out = tmp_path / "dl"
        cmd = [sys.executable, "-m", "data_tools", "download", str(tmp_path / "rows.jsonl"), "--out", str(out),
               "--concurrency", "1", "--output", "files"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = out / "fetch_log.jsonl"
        deadline = time.time() + 60
        try:
            while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        logged = {json.loads(x)["url"] for x in log.read_text().splitlines()}
        assert 3 <= len(logged) < 12, "the kill should land mid-run"
        report = download(
            tmp_path / "rows.jsonl", out, _cfg(read_timeout_s=30, output="files")
        )  # no timeouts on a busy machine
        assert report["n_ok"] == 12 and report["fetched_now"] == 12 - len(logged)
        for path in routes:
            if srv.url(path) in logged:
                assert srv.hits[path] == 1, path  # fetched before the kill, never again
        assert sum(srv.hits.values()) <= 12 + 1  # at most the one in flight at the kill is fetched twice


def test_mmsmall_download_command(tmp_path):
    """`mmsmall download ROWS --out DIR --url-field image_url --sha256-field image_sha256` (PixMo's columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from mmsmall.cli import app

    with LocalServer({"/a.jpg": Route(_jpg(30)), "/b.jpg": Route(_jpg(31))}) as srv:
        sha = hashlib.sha256(_jpg(30)).hexdigest()
        pq.write_table(pa.table({"image_url": [srv.url("/a.jpg"), srv.url("/b.jpg"), srv.url("/c.jpg")],
                                 "image_sha256": [sha, "1" * 64, None]}), tmp_path / "rows.parquet")  # fmt: skip
        args = ["download", str(tmp_path / "rows.parquet"), "--out", str(tmp_path / "dl"), "--url-field",
                "image_url", "--sha256-field", "image_sha256", "--retries", "0"]  # fmt: skip
        out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "dl" / "download_report.json").read_text())
    assert report["n_ok"] == 1 and report["failed"] == {"fetch_http_404": 1, "fetch_sha256_mismatch": 1}
    assert '"fetch_sha256_mismatch": 1' in out.output
    import tarfile

    with tarfile.open(tmp_path / "dl" / "shards" / "00000.tar") as tar:  # shards are the default output
        assert (
            tar.extractfile("000000000.jpg").read() == _jpg(30) and not (tmp_path / "dl" / "images").exists()
        )


# The child's own peak: VmHWM is per address space (ru_maxrss would carry the parent's peak over exec).
_PEAK = """
import sys
from data_tools.download import DownloadConfig, download
download(sys.argv[1], sys.argv[2], DownloadConfig(concurrency=8, per_host=8, retries=0, output=sys.argv[3]))
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))  # KiB
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak from /proc (Linux)")
@pytest.mark.parametrize("output", ["webdataset", "files"])
def test_rows_stream_with_memory_flat_in_the_row_count(tmp_path, output):
    """A 10k- and a 100k-row parquet naming the same 50 URLs (pixmo-points repeats an image_url per
    label; 40 of them 404, so the shards stay small on disk): the download's peak memory is the same,
    so rows are streamed, not read whole, in either output (shards: 10k rows each, so 1 against 10)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    routes = {f"/m{i}.jpg": Route(encode(natural_image(100 + i, (32, 24)), "JPEG")) for i in range(0, 50, 5)}
    peaks = {}
    with LocalServer(routes) as srv:
        urls = [srv.url(f"/m{i}.jpg") for i in range(50)]
        for n in (10_000, 100_000):
            rows = pa.table(
                {"url": [urls[i % 50] for i in range(n)], "caption": [f"row {i} " * 4 for i in range(n)]}
            )
            pq.write_table(rows, tmp_path / f"{n}.parquet", row_group_size=4096)
            out_dir = tmp_path / f"dl{n}"
            cmd = [sys.executable, "-c", _PEAK, str(tmp_path / f"{n}.parquet"), str(out_dir), output]
            out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                                 text=True, timeout=300, check=True)  # fmt: skip
            peaks[n] = int(out.stdout.split()[-1]) / 1024  # MiB
            report = json.loads((out_dir / "download_report.json").read_text())
            assert report["n_in"] == n and report["n_ok"] == n // 5
            assert report["failed"] == {"fetch_http_404": n - n // 5}
            if output == "files":
                assert (out_dir / "images.jsonl").read_text().count('"image":') == n // 5
            else:
                assert len(list((out_dir / "shards").glob("*.tar"))) == n // 10_000
        # each URL once per run (files) or once per shard (webdataset)
        assert sum(srv.hits.values()) == (100 if output == "files" else 50 * (1 + 10))
    assert peaks[100_000] - peaks[10_000] < 12, peaks  # MiB; rows read whole took 42 MiB more here


def test_webdataset_shards_from_laion_columns_resume_per_shard_and_curate(tmp_path):
    """`mmsmall download rows.parquet` (webdataset shards, the default) on LAION/DataComp columns (url, TEXT,
    key, similarity): img2dataset's layout (image + .txt + .json per row, failures in a per-shard log), a
    finished shard is never fetched again, and curation reads the shards."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from mmsmall.cli import app

    routes = {"/a.jpg": Route(_jpg(50), "binary/octet-stream"), "/b.jpg": Route(_jpg(51)),
              "/c.png": Route(encode(natural_image(52, (96, 72)), "PNG"), "image/png"), "/d.jpg": Route(_jpg(53)),
              "/page.html": Route(b"<html>moved</html>", "text/html")}  # fmt: skip
    with LocalServer(routes) as srv:
        paths = ["/a.jpg", "/missing.jpg", "/a.jpg", "/page.html", "/b.jpg", None, "/c.png", "/d.jpg"]
        urls = [srv.url(p) if p else None for p in paths]
        pq.write_table(pa.table({"url": urls, "TEXT": [f"a photo of thing number {i}" for i in range(8)],
                                 "key": [f"{i:09d}" for i in range(8)], "similarity": [0.3] * 8}),
                       tmp_path / "laion.parquet")  # fmt: skip
        args = ["download", str(tmp_path / "laion.parquet"), "--out", str(tmp_path / "dl"), "--shard-rows", "3", "--caption-field", "TEXT", "--retries", "0"]  # fmt: skip
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 0, out.output
        shards = tmp_path / "dl" / "shards"
        with tarfile.open(shards / "00000.tar") as tar:
            names = sorted(tar.getnames())
            meta = json.loads(tar.extractfile("000000.json").read())
        assert names == ["000000.jpg", "000000.json", "000000.txt", "000002.jpg", "000002.json", "000002.txt"]
        assert (
            meta["key"] == "000000"
            and meta["similarity"] == 0.3
            and meta["TEXT"] == "a photo of thing number 0"
        )
        fails = {k: sorted(json.loads(x)["reason"] for x in (shards / f"0000{k}_failures.jsonl").read_text().splitlines())
                 for k in range(3)}  # fmt: skip
        assert fails == {0: ["fetch_http_404"], 1: ["fetch_no_url", "fetch_not_image"], 2: []}
        assert srv.hits["/a.jpg"] == 1  # a URL twice in one shard is fetched once

        # a run killed in shard 2: its tar and stats are gone, a half-written tar is left
        (shards / "00002.tar").rename(shards / "00002.tar.tmp")
        (shards / "00002_stats.json").unlink()
        before = dict(srv.hits)
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 0, out.output
        report = json.loads((tmp_path / "dl" / "download_report.json").read_text())
        assert report["shards_written_now"] == 1 and report["n_ok"] == 5
        assert {p: srv.hits[p] - before.get(p, 0) for p in srv.hits} == {
            p: int(p in ("/c.png", "/d.jpg")) for p in srv.hits
        }

    summary = run_curation(
        {"inputs": [{"kind": "webdataset", "path": str(shards)}], "out_dir": str(tmp_path / "cur"),
         "report": {"enabled": False}, "dedup": {"near": False}},
        workers=1,
    )  # fmt: skip
    # 5 samples (a.jpg twice: one exact duplicate) and the 3 rows of the failure logs, under their reasons
    assert summary["n_in"] == 8 and summary["n_kept"] == 4, summary["dropped"]
    assert dict(summary["dropped"]) == {"exact_duplicate": 1, "fetch_http_404": 1, "fetch_no_url": 1,
                                        "fetch_not_image": 1}  # fmt: skip


def test_each_row_is_checked_against_its_own_sha256(tmp_path):
    """Two rows naming one URL with different expected hashes: the URL is fetched once, each row
    is judged by its own hash, whichever comes first (issue 23, item 8)."""
    from typer.testing import CliRunner

    from mmsmall.cli import app

    good = hashlib.sha256(_jpg(40)).hexdigest()
    with LocalServer({"/a.jpg": Route(_jpg(40))}) as srv:
        for order, hashes in (("bad_first", ["f" * 64, good.upper()]), ("good_first", [good, "f" * 64])):
            rows = [
                {"url": srv.url("/a.jpg"), "sha256": h, "caption": f"row {i}"} for i, h in enumerate(hashes)
            ]
            write_jsonl(tmp_path / f"{order}.jsonl", rows)
            out = tmp_path / order
            res = CliRunner().invoke(
                app, ["download", str(tmp_path / f"{order}.jsonl"), "--out", str(out), "--output", "files"]
            )
            assert res.exit_code == 0, res.output
            got = [json.loads(x) for x in (out / "images.jsonl").read_text().splitlines()]
            bad = 0 if order == "bad_first" else 1
            assert got[bad]["_error"] == "fetch_sha256_mismatch" and "image" not in got[bad]
            assert (out / got[1 - bad]["image"]).read_bytes() == _jpg(40)
        assert srv.hits["/a.jpg"] == 2  # once per download


def test_rows_of_one_url_in_different_batches_are_each_checked_against_their_own_sha256(
    tmp_path, monkeypatch
):
    """Rows are streamed one per batch here, so the rows naming a URL arrive in different batches: the
    URL is still fetched once per run, its bytes refused only when no row expects them, and each row
    is judged by its own hash, whichever batch it is in."""
    import data_tools.fetch as fetch

    monkeypatch.setattr(fetch, "ROW_BATCH", 1)
    good, other = hashlib.sha256(_jpg(60)).hexdigest(), hashlib.sha256(_jpg(61)).hexdigest()
    with LocalServer({"/a.jpg": Route(_jpg(60)), "/b.jpg": Route(_jpg(61))}) as srv:
        a, b = srv.url("/a.jpg"), srv.url("/b.jpg")
        for order, hashes in (
            ("bad_first", ["f" * 64, good, None]),
            ("good_first", [good.upper(), None, "f" * 64]),
        ):
            rows = [{"url": a, "sha256": hashes[0]}, {"url": b, "sha256": "e" * 64}, {"url": a, "sha256": hashes[1]},
                    {"url": b, "sha256": "d" * 64}, {"url": a, "sha256": hashes[2]}]  # fmt: skip
            write_jsonl(tmp_path / f"{order}.jsonl", rows)
            out = tmp_path / order
            report = download(tmp_path / f"{order}.jsonl", out, _cfg(output="files"))
            got = [json.loads(x) for x in (out / "images.jsonl").read_text().splitlines()]
            verdicts = [r.get("_error", "ok") for r in got]
            want = [("ok" if h is None or h.lower() == good else "fetch_sha256_mismatch") for h in hashes]
            assert verdicts == [want[0], "fetch_sha256_mismatch", want[1], "fetch_sha256_mismatch", want[2]]
            assert all((out / r["image"]).read_bytes() == _jpg(60) for r in got if "image" in r)
            assert report["fetched_now"] == 2 and report["n_ok"] == 2
            log = {(f := json.loads(x))["url"]: f for x in (out / "fetch_log.jsonl").read_text().splitlines()}
            assert log[a]["reason"] == "ok"  # some row of a expects its bytes
            assert (
                log[b]["reason"] == "fetch_sha256_mismatch" and log[b]["sha256"] == other
            )  # none of b's rows
            assert not (out / "images").exists() or not any(
                p.read_bytes() == _jpg(61) for p in (out / "images").rglob("*.*")
            )  # b's bytes, expected by no row, are not stored
        assert srv.hits["/a.jpg"] == 2 and srv.hits["/b.jpg"] == 2  # once per run


def test_webdataset_rows_are_each_checked_against_their_own_sha256(tmp_path):
    """Webdataset shards (the default output): rows of one URL with different hashes, in one shard and across shards: each
    row's verdict is its own; the URL is fetched once per shard (a shard does not keep bytes for the next)."""
    import tarfile

    good = hashlib.sha256(_jpg(62)).hexdigest()
    with LocalServer({"/a.jpg": Route(_jpg(62))}) as srv:
        a = srv.url("/a.jpg")
        hashes = ["f" * 64, good, good.upper(), None, "f" * 64, "e" * 64]  # shards of 2: mixed, good, all bad
        write_jsonl(
            tmp_path / "rows.jsonl",
            [{"url": a, "sha256": h, "caption": f"row {i}"} for i, h in enumerate(hashes)],
        )
        report = download(tmp_path / "rows.jsonl", tmp_path / "dl", _cfg(shard_rows=2))
        shards = tmp_path / "dl" / "shards"
        assert report["n_ok"] == 3 and report["failed"] == {"fetch_sha256_mismatch": 3}
        fails = {k: [json.loads(x) for x in (shards / f"0000{k}_failures.jsonl").read_text().splitlines()]
                 for k in range(3)}  # fmt: skip
        assert [f["key"] for f in fails[0]] == ["000000"] and fails[0][0]["reason"] == "fetch_sha256_mismatch"
        assert fails[1] == [] and [f["key"] for f in fails[2]] == ["000020", "000021"]
        with tarfile.open(shards / "00000.tar") as tar:
            assert sorted(tar.getnames()) == ["000001.jpg", "000001.json", "000001.txt"]
            assert tar.extractfile("000001.jpg").read() == _jpg(62)
        with tarfile.open(shards / "00002.tar") as tar:
            assert tar.getnames() == []
        assert srv.hits["/a.jpg"] == 3  # once per shard


def test_retry_failed_refetches_only_the_failed_rows_of_finished_shards(tmp_path):
    """`mmsmall download ROWS --out DIR --retry-failed` on shards: a finished shard's failed rows are
    fetched again and join its tar beside the samples it had (copied, not refetched); a shard with no
    failures is left alone."""
    import tarfile

    from typer.testing import CliRunner

    from mmsmall.cli import app

    routes = {f"/r{i}.jpg": Route(_jpg(70 + i)) for i in range(5)}
    with LocalServer(routes) as srv:
        paths = ["/r0.jpg", "/late.jpg", "/r1.jpg", "/r2.jpg", "/r3.jpg", "/r4.jpg"]
        write_jsonl(tmp_path / "rows.jsonl", _rows(srv, paths))
        first = download(tmp_path / "rows.jsonl", tmp_path / "dl", _cfg(shard_rows=3))
        assert first["failed"] == {"fetch_http_404": 1}
        routes["/late.jpg"] = Route(_jpg(79))  # the server gets the file meanwhile
        before = dict(srv.hits)
        args = ["download", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "dl"), "--shard-rows", "3"]
        res = CliRunner().invoke(app, [*args, "--retry-failed"])
        assert res.exit_code == 0, res.output
        again = json.loads((tmp_path / "dl" / "download_report.json").read_text())
        assert {p: n - before.get(p, 0) for p, n in srv.hits.items() if n != before.get(p, 0)} == {
            "/late.jpg": 1
        }
        assert again["n_ok"] == 6 and again["failed"] == {} and again["shards_written_now"] == 1
    shards = tmp_path / "dl" / "shards"
    with tarfile.open(shards / "00000.tar") as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert {k: v for k, v in got.items() if k.endswith(".jpg")} == {
        "000000.jpg": _jpg(70), "000001.jpg": _jpg(79), "000002.jpg": _jpg(71)}  # fmt: skip
    assert json.loads(got["000001.json"])["url"] == srv.url("/late.jpg")
    assert (shards / "00000_failures.jsonl").read_text() == ""
    assert json.loads((shards / "00000_stats.json").read_text())["reasons"] == {"ok": 3}


def test_pixmo_input_refuses_a_downloads_folder_of_shards_with_the_command_to_run(tmp_path):
    """The pixmo input reads the loose-file layout; pointed at the default (shards) output it stops
    before any work, saying to fetch with --output files."""
    from mmsmall.config import ConfigError

    (tmp_path / "dl" / "shards").mkdir(parents=True)
    cfg = {"inputs": [{"kind": "pixmo", "layout": "points", "path": str(tmp_path / "pixmo-points"),
                       "downloads": str(tmp_path / "dl")}], "out_dir": str(tmp_path / "cur")}  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"inputs\[0\]\.downloads: .* holds webdataset shards.*--output files"
    ):
        run_curation(cfg, workers=1)
    assert not (tmp_path / "cur").exists()


def shard_contents(folder: Path) -> dict[str, object]:
    """Per shard: its samples by member name (the bytes), its failures (key and reason) and its stats.
    Members are compared by name, not position: a shard writes samples in the order fetches finish."""
    import tarfile

    got: dict[str, object] = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            got[tar.name] = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        fails = [json.loads(x) for x in (folder / f"{tar.stem}_failures.jsonl").read_text().splitlines()]
        got[f"{tar.stem}_failures"] = sorted(f"{f['key']} {f['reason']}" for f in fails)
        got[f"{tar.stem}_stats"] = json.loads((folder / f"{tar.stem}_stats.json").read_text())
    return got


@pytest.mark.slow
def test_local_workers_write_the_same_shards(tmp_path):
    """`mmsmall download ROWS --out DIR --workers 2`: two shards at a time in local processes, the same
    shards as one after another in this process; `--output files` has one fetch log, so it refuses."""
    from typer.testing import CliRunner

    from mmsmall.cli import app

    routes = {f"/w{i}.jpg": Route(_jpg(80 + i)) for i in range(9)}
    with LocalServer(routes) as srv:
        write_jsonl(tmp_path / "rows.jsonl", _rows(srv, [*routes, "/missing.jpg", "/w2.jpg", "/w0.jpg"]))
        args = ["download", str(tmp_path / "rows.jsonl"), "--shard-rows", "4", "--retries", "0"]
        for out, extra in (("one", []), ("two", ["--workers", "2"])):
            res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / out), *extra])
            assert res.exit_code == 0, res.output
        res = CliRunner().invoke(
            app, [*args, "--out", str(tmp_path / "f"), "--output", "files", "--workers", "2"]
        )
        assert res.exit_code == 2 and "--output files runs in one process" in res.output
    want = shard_contents(tmp_path / "one" / "shards")
    assert len(want) == 9 and want["00002_failures"] == ["000021 fetch_http_404"]
    assert shard_contents(tmp_path / "two" / "shards") == want
