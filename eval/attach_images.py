"""Attach downloaded images to rows that hold image URLs (the PixMo eval sets), for ``mmsmall eval``.

    python -m eval.attach_images allenai/pixmo-points-eval --downloads /data/pe-dl --out /data/pixmo-points-eval
    python -m eval.attach_images /data/pixmo-count --split validation --images /data/my-images --out /data/pc-val

ROWS is a hub id or a copy in the hub layout (or a ``save_to_disk`` folder); the images come from
the download stage's output folder (``--downloads``: ``mmsmall download ROWS --out DIR
--url-field image_url --sha256-field image_sha256``, its loose files read through the fetch log, or
its webdataset shards with ``--output webdataset``) or from a folder of
files named as the download stage names them (``--images``: the sha256 hex of the URL, any
extension, at any depth, e.g. ``images/ab/ab12...ef.jpg``). OUT is a hub-layout copy
(``data/{split}-00000-of-00001.parquet`` + README) with every column of ROWS plus ``image``, which
``mmsmall eval --data TASK=OUT`` reads. A row whose image is missing, failed to download, does not
decode, or has bytes whose sha256 is not the row's ``image_sha256`` is left out, counted by reason
in ``OUT/attach.json``: Molmo's own eval sets keep only the rows whose URL downloaded
(allenai/molmo ``olmo/data/pixmo_datasets.py``, ``PixMoPointsEval.download``, ``PixMoCount.download``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import yaml

from .tasks.base import EvalDataError


def _image_index(folder: Path) -> dict[str, Path]:
    """Files of ``folder`` keyed by their stem, when it is a URL key (64 hex digits)."""
    index = {}
    for p in folder.rglob("*"):
        stem = p.name.split(".", 1)[0]
        if p.is_file() and len(stem) == 64 and all(c in "0123456789abcdef" for c in stem):
            index[stem] = p
    return index


class _ShardImages:
    """``url`` -> image bytes (or a failure reason) from the download stage's webdataset output
    (``DIR/shards/*.tar``: ``{key}.{ext}`` + ``{key}.json`` with the row's ``url``; failed rows in
    ``*_failures.jsonl``), keeping only the bytes of ``wanted`` URLs."""

    def __init__(self, folder: Path, wanted: set[str]):
        import tarfile

        self.data: dict[str, bytes] = {}
        self.failed: dict[str, str] = {}
        for log in sorted((folder / "shards").glob("*_failures.jsonl")):
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                self.failed[str(row.get("url"))] = str(row.get("reason") or "failed")
        for tar_path in sorted((folder / "shards").glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                key, body = None, None
                for m in tar:
                    stem, _, ext = m.name.rpartition(".")
                    if stem != key:
                        key, body = stem, None
                    f = tar.extractfile(m) if m.isfile() else None
                    if f is None:
                        continue
                    if ext == "json":
                        url = str(json.loads(f.read()).get("url"))
                        if body is not None and url in wanted:
                            self.data[url] = body
                    elif ext != "txt":
                        body = f.read()

    def get(self, url: str) -> tuple[bytes | None, str, str | None]:
        if url in self.data:
            return self.data[url], url, None
        return None, url, self.failed.get(url, "not_downloaded")


def _decodes(data: bytes) -> str | None:
    """The image's format extension, or None when the bytes are not an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            return (im.format or "img").lower().replace("jpeg", "jpg")
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        return None


def attach_images(
    rows: str,
    out: str | Path,
    *,
    downloads: str | None = None,
    images: str | None = None,
    split: str = "test",
    url_field: str = "image_url",
    sha256_field: str = "image_sha256",
) -> dict:
    """Write the hub-layout copy (see the module docstring); returns the counts written to ``attach.json``."""
    import datasets

    from data_tools.fetch import url_key
    from data_tools.pixmo import Downloads
    from mmsmall.data.hfdata import HFDataError, load_hf

    if (downloads is None) == (images is None):
        raise EvalDataError("attach_images: give one image source, --downloads DIR or --images DIR")
    source = Path(downloads or images)
    if not source.is_dir():
        raise EvalDataError(f"attach_images: {source} is not a folder")
    shards = downloads is not None and any((source / "shards").glob("*.tar"))
    if downloads and not shards and not (source / "fetch_log.jsonl").is_file():
        raise EvalDataError(
            f"attach_images: {source} has neither fetch_log.jsonl nor shards/*.tar; --downloads takes the "
            "output folder of `mmsmall download` (files or webdataset output); a folder of images named "
            "by URL key is --images"
        )
    try:
        ds = load_hf(rows, split=split)
    except HFDataError as e:
        raise EvalDataError(f"attach_images: {e}") from None
    if url_field not in ds.column_names:
        raise EvalDataError(
            f"attach_images: {rows} split {split!r} has no {url_field!r} column ({ds.column_names})"
        )
    if shards:
        fetched = _ShardImages(source, {str(u) for u in ds[url_field]})
    else:
        fetched = Downloads(str(source)) if downloads else None
    index = _image_index(source) if images else {}
    keep, cells, dropped = [], [], {}
    has_sha = sha256_field in ds.column_names
    for i, (url, want) in enumerate(zip(ds[url_field], ds[sha256_field] if has_sha else [None] * len(ds))):
        key = url_key(str(url))
        if fetched is not None:
            data, _, reason = fetched.get(str(url))
        else:
            path = index.get(key)
            data, reason = (path.read_bytes(), None) if path else (None, "not_downloaded")
        if data is not None and want and hashlib.sha256(data).hexdigest() != want:
            data, reason = None, "fetch_sha256_mismatch"
        ext = _decodes(data) if data is not None else None
        if data is not None and ext is None:
            data, reason = None, "undecodable"
        if data is None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        keep.append(i)
        cells.append({"bytes": data, "path": f"{key}.{ext}"})
    if not keep:
        raise EvalDataError(
            f"attach_images: none of the {len(ds)} rows of {rows} ({split}) has its image in {source} "
            f"(reasons: {dropped}); download them first: mmsmall download ROWS --out DIR --url-field {url_field}"
        )
    part = ds.select(keep).add_column("image", cells).cast_column("image", datasets.Image())
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    part.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    readme = out / "README.md"
    meta = yaml.safe_load(readme.read_text().split("---")[1]) if readme.is_file() else {}
    configs = [c for c in meta.get("configs", []) if c.get("config_name") == "default"] or [
        {"config_name": "default", "data_files": []}
    ]
    files = [f for f in configs[0]["data_files"] if f["split"] != split]
    configs[0]["data_files"] = [*files, {"split": split, "path": f"data/{split}-*"}]
    meta["configs"] = configs
    readme.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n")
    counts = {"rows": len(ds), "attached": len(keep), "dropped": dropped, "source": str(rows), "split": split}
    report = out / "attach.json"
    done = json.loads(report.read_text()) if report.is_file() else {}
    done[split] = counts
    report.write_text(json.dumps(done, indent=2) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.attach_images", description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", help="hub id or hub-layout copy of the rows (image URLs)")
    ap.add_argument("--out", required=True, help="folder for the copy with images")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--downloads", help="output folder of `mmsmall download` (its fetch_log.jsonl)")
    src.add_argument("--images", help="folder of images named by the sha256 of their URL")
    ap.add_argument(
        "--split", default="test", help="split to attach (default test; pixmo-count: validation, test)"
    )
    ap.add_argument("--url-field", default="image_url")
    ap.add_argument("--sha256-field", default="image_sha256")
    args = ap.parse_args(argv)
    try:
        counts = attach_images(args.rows, args.out, downloads=args.downloads, images=args.images,
                               split=args.split, url_field=args.url_field, sha256_field=args.sha256_field)  # fmt: skip
    except EvalDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
