"""Read user inputs as work units of raw records.

Planning (:func:`plan_units`) is cheap and deterministic: it lists what each unit will read
(rows of a caption file, a row range of a parquet file, one tar of a shard folder) without
touching images. Reading (:func:`read_unit`) yields one :class:`dict` record per input sample:

    {"id": str, "source": str, "task": str, "image_bytes": bytes | None, "image_ref": str,
     "messages": [{"role", "content"}], "points": [{"label", "xy"}] | None, "meta": dict,
     "error": str | None,   # error = a drop reason code found while reading
     "images": [bytes | None, ...] | None,  # a sample of several images (pages), in order; else None
     "file": str | None, "files": [str]}    # local image file(s) read, for the rerun check

A row gives several images through ``images_field`` (a list, each item as ``image_field`` takes
it); a list of one is a one-image sample. A tar sample gives them as ``{key}.0.jpg``, ``{key}.1.png``...

Tar shards are read in memory only; member names are never used as file-system paths.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmsmall.config import ConfigError
from mmsmall.data.keys import member_key
from mmsmall.data.remote import fetch_shard, is_remote, resolve_remote
from mmsmall.data.shards import TAR_SUFFIXES, list_tars, tar_members

from .config import CurateConfig, InputConfig
from .records import CAPTION_PROMPT, clean_id, clean_messages, clean_points, scalar_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_PAGE_EXT = re.compile(r"(\d+)\.(jpg|jpeg|png|webp)")  # a member {key}.3.png: image 3 of its sample


# ----------------------------------------------------------------------------- planning


def _source_name(inp: InputConfig) -> str:
    return inp.name or Path(inp.path.rstrip("/")).stem or "input"


def _read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl or .csv file (a bad jsonl line, or one that is not UTF-8, becomes a row with `_error`)."""
    if not path.exists():
        raise ConfigError(f"input file not found: {path}")
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = [dict(r) for r in csv.DictReader(f)]
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the csv as UTF-8") from None
    else:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8"))
                    if not isinstance(row, dict):
                        raise ValueError("not an object")
                except ValueError:  # UnicodeDecodeError too
                    row = {"_error": "bad_annotation", "_line": lineno}
                rows.append(row)
    return rows


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def plan_units(cfg: CurateConfig) -> list[dict]:
    """The ordered work units of all inputs; each unit is a JSON-serializable dict."""
    units: list[dict] = []
    for i, inp in enumerate(cfg.inputs):
        base = {"input": i}
        path = Path(inp.path)
        if inp.kind in ("folder", "jsonl", "csv"):
            rows = _folder_rows(inp, [Path(p) for p in (cfg.out_dir, cfg.work_dir) if p])
            for a, b in _chunks(len(rows), cfg.unit_size):
                units.append({**base, "rows": rows[a:b], "offset": a})
        elif inp.kind == "points":
            groups = _point_groups(inp)
            for a, b in _chunks(len(groups), cfg.unit_size):
                units.append({**base, "rows": groups[a:b], "offset": a})
        elif inp.kind == "parquet":
            import pyarrow.parquet as pq

            files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
            if not files or not files[0].exists():
                raise ConfigError(f"inputs[{i}]: no parquet files at {path}")
            _refuse_url_rows(i, inp, files[0], pq.ParquetFile(files[0]).schema_arrow.names)
            for f in files:
                n = pq.ParquetFile(f).metadata.num_rows
                for a, b in _chunks(n, cfg.unit_size):
                    units.append({**base, "file": str(f), "start": a, "stop": b})
        elif inp.kind == "hf":
            units.extend({**base, **u} for u in _hf_units(inp, cfg.unit_size))
        elif inp.kind == "pixmo":
            from .pixmo import pixmo_units

            units.extend({**base, **u} for u in pixmo_units(inp, _load_hf(inp), cfg.unit_size))
        elif inp.kind == "webdataset" and is_remote(inp.path):  # http(s):// shards or pipe: commands
            units.extend({**base, "file": t} for t in resolve_remote(inp.path))
        elif inp.kind == "webdataset":
            tars = list_tars(path) if path.is_dir() else [path]
            if not tars or not tars[0].exists():
                raise ConfigError(f"inputs[{i}]: no {', '.join(TAR_SUFFIXES)} shards at {path}")
            units.extend({**base, "file": str(t)} for t in tars)
    for n, u in enumerate(units):
        u["uid"] = f"u{n:06d}"
    return units


URL_COLUMNS = (
    "url",
    "URL",
    "image_url",
)  # LAION-400M/5B: URL; DataComp, img2dataset's own: url; PixMo: image_url


def _refuse_url_rows(i: int, inp: InputConfig, file: Path, columns: list[str]) -> None:
    """A parquet of image URLs with no image column (LAION/DataComp metadata) is the download stage's
    input, not curation's: say so, with the command, instead of dropping every row as missing_image."""
    url = next((c for c in URL_COLUMNS if c in columns), None)
    if inp.image_field in columns or url is None:
        return
    caption = next((c for c in ("TEXT", "text", "caption") if c in columns), "caption")
    raise ConfigError(
        f"inputs[{i}] ({file}): rows of image URLs (column {url!r}) and no image column {inp.image_field!r}; "
        f"fetch them first: `mmsmall download {inp.path} --out DIR --url-field {url} --caption-field {caption}`, "
        "then curate {kind: webdataset, path: DIR/shards}"
    )


def _folder_rows(inp: InputConfig, skip: list[Path]) -> list[dict]:
    """Rows of a caption file, or one row per image of a folder (its ``.txt`` the caption); images
    under ``skip`` (the run's own output and work folders) are not inputs."""
    path = Path(inp.path)
    if inp.kind in ("jsonl", "csv"):
        return _read_rows(path)
    if inp.captions:
        return _read_rows(Path(inp.captions))
    if not path.is_dir():
        raise ConfigError(f"input folder not found: {path}")
    rows = []
    images = (q for q in path.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and not q.is_dir())
    for p in sorted(q for q in images if not any(q.is_relative_to(s) for s in skip)):
        row = {inp.image_field: str(p.relative_to(path)), inp.text_field: ""}
        txt = p.with_suffix(".txt")
        try:
            row[inp.text_field] = txt.read_bytes().decode("utf-8") if txt.exists() else ""
        except (UnicodeDecodeError, OSError) as e:  # this sample is bad, not the folder
            row |= {"_error": "bad_annotation", "_line": f"{txt} unreadable as UTF-8 ({type(e).__name__})"}
        rows.append(row)
    return rows


def _point_groups(inp: InputConfig) -> list[dict]:
    """PixMo-Points style rows (one label per row) grouped by image, first-seen order."""
    groups: dict[str, dict] = {}
    bad: list[dict] = []
    for row in _read_rows(Path(inp.path)):
        img = row.get(inp.image_field) or row.get("image_url")
        if "_error" in row or not isinstance(img, str):
            bad.append({"_error": row.get("_error", "bad_annotation"), "_line": row.get("_line")})
            continue
        g = groups.setdefault(
            img, {"image": img, "id": clean_id(row.get(inp.id_field) or img) or img, "labels": []}
        )
        g["labels"].append(
            {
                "label": row.get("label", ""),
                "points": row.get("points", []),
                "width": row.get("width"),
                "height": row.get("height"),
            }
        )
    return list(groups.values()) + bad


def _load_hf(inp: InputConfig):
    """The input's split through the loader eval shares (hub id, hub-repo folder, save_to_disk
    folder, parquet/arrow file); images stay encoded ``{bytes, path}`` until validation decodes them."""
    from mmsmall.data.hfdata import HFDataError, load_hf

    try:
        return load_hf(inp.path, split=inp.split, config=inp.config or None, streaming=inp.streaming)
    except HFDataError as e:
        raise ConfigError(f"input kind 'hf': {e}") from None


def _hf_units(inp: InputConfig, unit_size: int) -> list[dict]:
    """Row ranges of a materialized dataset; with ``streaming``, one unit per stream shard (file)."""
    ds = _load_hf(inp)
    if inp.streaming:
        return [{"shard": k, "num_shards": ds.num_shards} for k in range(ds.num_shards)]
    return [{"start": a, "stop": b} for a, b in _chunks(len(ds), unit_size)]


def _hf_rows(unit: dict, inp: InputConfig) -> tuple[list[dict], int]:
    """(rows, first row number) of one hf unit; a streamed shard is read start to end."""
    ds = _load_hf(inp)
    if "shard" in unit:
        return list(ds.shard(num_shards=unit["num_shards"], index=unit["shard"])), unit["shard"] * 10**9
    return list(ds.select(range(unit["start"], unit["stop"]))), unit["start"]


# ----------------------------------------------------------------------------- reading


def _root(inp: InputConfig) -> Path:
    if inp.image_root:
        return Path(inp.image_root)
    p = Path(inp.path)
    if inp.kind == "folder":
        return p
    return p.parent


def _read_file(path: Path) -> tuple[bytes | None, str | None]:
    try:
        return path.read_bytes(), None
    except FileNotFoundError:
        return None, "missing_image"
    except (IsADirectoryError, PermissionError, OSError, ValueError):  # ValueError: a NUL in the path
        return None, "unreadable"


def _messages_from_row(row: dict, inp: InputConfig) -> tuple[list[dict] | None, str]:
    """The row's conversation and task; messages None when a text field has the wrong shape."""
    msgs = row.get("messages")
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except ValueError:
            return None, inp.task or "vqa"
    if msgs is not None and msgs != []:
        return clean_messages(msgs), inp.task or "vqa"
    q, a = row.get(inp.question_field), row.get(inp.answer_field)
    if q is not None and a is not None:
        if isinstance(a, list):
            a = a[0] if a else ""
        q, a = scalar_text(q), scalar_text(a)
        if q is None or a is None:
            return None, inp.task or "vqa"
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}], inp.task or "vqa"
    cap = row.get(inp.text_field)
    if cap is None:
        cap = row.get("text", "")
    cap = scalar_text(cap)
    if cap is None:
        return None, inp.task or "caption"
    return [
        {"role": "user", "content": CAPTION_PROMPT},
        {"role": "assistant", "content": cap},
    ], inp.task or "caption"


def _row_id(row: dict, inp: InputConfig, fallback: str) -> tuple[str, str | None]:
    """(id, error): a container or bool id keeps the row-number id and marks the row bad."""
    value = row.get(inp.id_field)
    if value is None or value == "":
        return fallback, None
    rid = clean_id(value)
    return (rid, None) if rid is not None else (fallback, "bad_annotation")


def _image_value(value: Any, root: Path) -> tuple[bytes | None, str, str | None]:
    """(bytes, ref, error) from bytes, a path, or an HF ``{"bytes", "path"}`` struct; a local file
    read (or looked for) is the ref itself, an absolute path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            if not isinstance(value["bytes"], (bytes, bytearray, memoryview)):
                return None, "<bytes>", "bad_annotation"
            return bytes(value["bytes"]), str(value.get("path") or "<bytes>"), None
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), "<bytes>", None
    if hasattr(value, "save"):  # a PIL image from `datasets`
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue(), "<pil>", None
    if isinstance(value, str) and value:
        p = Path(value)
        p = p if p.is_absolute() else root / p
        data, err = _read_file(p)
        return data, str(p), err
    return None, "<none>", "missing_image"


def _row_images(row: dict, inp: InputConfig, root: Path) -> tuple[dict, str | None]:
    """(record fields, error) of a row's image, or of its ``images_field`` list of images."""
    one, many = row.get(inp.image_field), row.get(inp.images_field)
    if many is None or many == "":
        data, ref, err = _image_value(one, root)
        return {"image_bytes": data, "image_ref": ref, "file": _local(one, ref)}, err
    if one is not None and one != "":
        detail = f"both {inp.image_field!r} and {inp.images_field!r} given; a row takes one of them"
        return {"image_ref": detail}, "bad_annotation"
    if isinstance(many, str) and many.lstrip().startswith("["):  # a csv cell holding a JSON list
        try:
            many = json.loads(many)
        except ValueError:
            pass
    if not isinstance(many, list):
        return {"image_ref": f"{inp.images_field!r} is not a list of images"}, "bad_annotation"
    if not many:
        return {"image_ref": f"{inp.images_field!r} is an empty list"}, "missing_image"
    datas, refs, files, err, where = [], [], [], None, ""
    for i, value in enumerate(many):
        data, ref, e = _image_value(value, root)
        datas.append(data)
        refs.append(ref)
        if (f := _local(value, ref)) is not None:
            files.append(f)
        if e is not None and err is None:
            err, where = e, f"image {i} of {len(many)}: {ref}"
    if len(many) == 1:  # one image stays the one-image sample
        return {"image_bytes": datas[0], "image_ref": refs[0], "file": files[0] if files else None}, err
    ref = where or f"{refs[0]} (+{len(refs) - 1} more)"
    return {"image_bytes": datas[0], "images": datas, "image_ref": ref, "files": files}, err


def _local(value: Any, ref: str) -> str | None:
    """The local file an image value named (read, or looked for when missing), else None."""
    if isinstance(value, dict) and not value.get("bytes"):
        value = value.get("path")
    return ref if isinstance(value, str) and value and not is_remote(value) else None


def _record(rid: str, source: str, **kw: Any) -> dict:
    rec = {
        "id": rid,
        "source": source,
        "task": "caption",
        "image_bytes": None,
        "image_ref": "",
        "messages": [],
    }
    rec.update({"points": None, "meta": {}, "error": None, "file": None, "images": None, "files": []})
    rec.update(kw)
    return rec


def _rows_records(unit: dict, inp: InputConfig) -> Iterator[dict]:
    source, root = _source_name(inp), _root(inp)
    for n, row in enumerate(unit["rows"]):
        rid, id_err = _row_id(row, inp, f"{source}_{unit['offset'] + n}")
        if "_error" in row:
            yield _record(rid, source, error=row["_error"], image_ref=f"line {row.get('_line')}")
            continue
        fields, err = _row_images(row, inp, root)
        msgs, task = _messages_from_row(row, inp)
        err = id_err or (err if msgs is not None else "bad_annotation")
        yield _record(rid, source, task=task, messages=msgs or [], error=err, **fields)


def _points_records(unit: dict, inp: InputConfig) -> Iterator[dict]:
    source, root = _source_name(inp), _root(inp)
    for n, g in enumerate(unit["rows"]):
        if "_error" in g:
            rid = f"{source}_bad_{unit['offset'] + n}"
            yield _record(rid, source, error=g["_error"], image_ref=f"line {g.get('_line')}")
            continue
        data, ref, err = _image_value(g["image"], root)
        pts = [
            {"label": lab["label"], "raw": lab["points"], "width": lab["width"], "height": lab["height"]}
            for lab in g["labels"]
        ]
        yield _record(
            str(g["id"]), source, task=inp.task or "pointing", image_bytes=data, image_ref=ref,
            points=pts, meta={"coords": inp.coords}, error=err, file=_local(g["image"], ref),
        )  # fmt: skip


def _table_records(table_rows: list[dict], start: int, inp: InputConfig, root: Path) -> Iterator[dict]:
    source = _source_name(inp)
    for n, row in enumerate(table_rows):
        rid, id_err = _row_id(row, inp, f"{source}_{start + n}")
        fields, err = _row_images(row, inp, root)
        msgs, task = _messages_from_row(row, inp)
        err = id_err or (err if msgs is not None else "bad_annotation")
        yield _record(rid, source, task=task, messages=msgs or [], error=err, **fields)


def _tar_records(unit: dict, inp: InputConfig) -> Iterator[dict]:
    """Samples of one webdataset tar, read in memory; hostile names only become sanitized ids."""
    source = _source_name(inp)
    groups: dict[str, dict[str, bytes]] = {}
    bad: list[str] = []
    dups: list[str] = []
    try:
        src = io.BytesIO(fetch_shard(unit["file"])) if is_remote(unit["file"]) else None  # http(s)/pipe:
        with tarfile.open(fileobj=src) if src else tarfile.open(unit["file"], "r:*") as tar:
            for m in tar_members(tar):
                name = m.name
                key, ext = member_key(name) or (name, "")
                if not m.isfile():
                    if not m.isdir():
                        bad.append(name)
                    continue
                if ext in groups.setdefault(key, {}):  # a repeated member: counted, the first kept
                    dups.append(name)
                    continue
                f = tar.extractfile(m)
                groups[key][ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        groups.pop(next(reversed(groups), None), None)  # the sample being read may be cut short
        yield _record(
            f"{source}_{Path(unit['file']).stem}", source, error="unreadable_shard",
            image_ref=f"{unit['file']}: {type(e).__name__}: {e}",
        )  # fmt: skip
    for name in bad:
        yield _record(name, source, error="unsafe_member", image_ref=name)
    for name in dups:
        yield _record(name, source, error="duplicate_member", image_ref=name)
    for key, parts in groups.items():
        meta: dict = {}
        err = None
        if "json" in parts:
            try:
                meta = json.loads(parts["json"])
                if not isinstance(meta, dict):
                    raise ValueError
            except ValueError:
                meta, err = {}, "bad_annotation"
        msgs = clean_messages(meta.get("messages") or [])
        if not msgs and "txt" in parts:
            cap = parts["txt"].decode("utf-8", "replace")
            msgs = [{"role": "user", "content": CAPTION_PROMPT}, {"role": "assistant", "content": cap}]
        points = meta.get("points")
        points = clean_points(points) if points is not None else None
        names = [
            clean_id(meta.get(k) or dflt)
            for k, dflt in (("id", key), ("source", source), ("task", inp.task or "caption"))
        ]
        extra = meta.get("meta", {})
        shape_ok = msgs is not None and (points is not None or meta.get("points") is None)
        if not (shape_ok and None not in names and isinstance(extra, dict)):
            err, msgs, points, extra = err or "bad_annotation", [], None, {}
            names = [n if n is not None else d for n, d in zip(names, (key, source, "caption"))]
        fields, img_err = _tar_images(parts, meta.get("images"))
        fields["image_ref"] = f"{unit['file']}:{key}" + fields.get("image_ref", "")
        yield _record(
            names[0], names[1], task=names[2], messages=msgs, points=points,
            meta={**extra, "coords": "normalized"} if points is not None else extra,
            error=err or img_err, **fields,
        )  # fmt: skip


_I2D_HTTP = re.compile(r"HTTP Error (\d{3})")


def _img2dataset_reason(status: str, message: str) -> str:
    """A reason code for an img2dataset failure: its ``error_message`` is free text (urllib's
    ``str(err)``, ``hash mismatch``, the resizer's message), its ``status`` failed_to_download or
    failed_to_resize (img2dataset/downloader.py)."""
    if m := _I2D_HTTP.search(message):
        return f"fetch_http_{m.group(1)}"
    if message == "hash mismatch":
        return "fetch_sha256_mismatch"
    if "timed out" in message.lower():
        return "fetch_timeout"
    return f"fetch_{status}" if status in ("failed_to_download", "failed_to_resize") else "fetch_failed"


def _shard_failures(tar: str, source: str) -> Iterator[dict]:
    """The rows a download wrote no sample for, from the files beside its shard: ours
    (``{shard}_failures.jsonl``, data_tools/download_shards.py) or img2dataset's (``{shard}.parquet``:
    every row with its ``status``; the failures have no sample in the tar). Each one a record with
    its reason, so failed downloads show in the funnel; a shard with neither file yields none."""
    path = Path(tar)
    suffix = next((s for s in TAR_SUFFIXES if path.name.endswith(s)), path.suffix)
    stem = path.parent / path.name[: len(path.name) - len(suffix)]
    ours, theirs = Path(f"{stem}_failures.jsonl"), Path(f"{stem}.parquet")
    if ours.exists():
        for n, line in enumerate(ours.read_text(encoding="utf-8").splitlines()):
            try:
                f = json.loads(line)
                key, reason = clean_id(f.get("key")) or f"{stem.name}_fail{n}", str(f["reason"])
            except (ValueError, KeyError, TypeError, AttributeError):
                key, reason = f"{stem.name}_fail{n}", "bad_annotation"
            yield _record(key, source, error=reason, image_ref=f"{ours}:{n + 1}")
    elif theirs.exists():
        import pyarrow.parquet as pq

        f = pq.ParquetFile(theirs)
        if not {"key", "status"} <= set(f.schema_arrow.names):
            return
        cols = [c for c in ("key", "status", "error_message", "url") if c in f.schema_arrow.names]
        for batch in f.iter_batches(columns=cols):
            for row in batch.to_pylist():
                if row["status"] == "success":
                    continue
                msg = str(row.get("error_message") or "")
                yield _record(clean_id(row["key"]) or str(row["key"]), source,
                              error=_img2dataset_reason(str(row["status"]), msg),
                              image_ref=f"{row.get('url')}: {msg}")  # fmt: skip


def _tar_images(parts: dict[str, bytes], listed: Any) -> tuple[dict, str | None]:
    """(record fields, error) of one tar sample's image members: ``{key}.jpg``, or ``{key}.0.jpg``,
    ``{key}.1.png``, ... numbered 0..n-1 (as many as its json's ``images`` list, when it has one)."""
    plain = next((e for e in TAR_IMAGE_EXTS if e in parts), None)
    pages: dict[int, bytes] = {}
    for ext, data in sorted(parts.items()):
        if (m := _PAGE_EXT.fullmatch(ext)) is not None:
            pages.setdefault(int(m[1]), data)
    if not pages:
        return {"image_bytes": parts.get(plain) if plain else None}, None if plain else "missing_image"
    if plain is not None:
        return {"image_ref": f": both .{plain} and numbered images .0.jpg ..."}, "bad_annotation"
    n = len(pages)
    if sorted(pages) != list(range(n)):
        return {"image_ref": f": images numbered {sorted(pages)[:8]}, not 0..{n - 1}"}, "missing_image"
    if isinstance(listed, list) and len(listed) != n:
        return {"image_ref": f": its json lists {len(listed)} images, the tar holds {n}"}, "missing_image"
    images = [pages[i] for i in range(n)]
    return {"image_bytes": images[0], "images": images if n > 1 else None}, None


def _parquet_rows(path: str, start: int, stop: int) -> list[dict]:
    """Rows [start, stop) of a parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    groups, first, offset = [], None, 0
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return []
    return f.read_row_groups(groups).slice(start - first, stop - start).to_pylist()


def read_unit(unit: dict, cfg: CurateConfig) -> Iterator[dict]:
    """Yield the raw records of one work unit in a fixed order."""
    inp = cfg.inputs[unit["input"]]
    if inp.kind in ("folder", "jsonl", "csv"):
        yield from _rows_records(unit, inp)
    elif inp.kind == "points":
        yield from _points_records(unit, inp)
    elif inp.kind == "parquet":
        root = Path(inp.image_root) if inp.image_root else Path(unit["file"]).parent  # beside the file
        yield from _table_records(
            _parquet_rows(unit["file"], unit["start"], unit["stop"]), unit["start"], inp, root
        )
    elif inp.kind == "hf":
        yield from _table_records(*_hf_rows(unit, inp), inp, _root(inp))
    elif inp.kind == "webdataset":
        yield from _tar_records(unit, inp)
        if not is_remote(unit["file"]):
            yield from _shard_failures(unit["file"], _source_name(inp))
    elif inp.kind == "pixmo":
        from .pixmo import pixmo_records

        yield from pixmo_records(unit, inp, _load_hf(inp), _record)
