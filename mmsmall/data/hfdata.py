"""Hugging Face data in: one loader for hub ids and local copies, used by curation and eval.

``load_hf(path, split=..., config=..., streaming=...)`` returns a ``datasets.Dataset`` (or an
``IterableDataset`` when streaming) for any of:

- a hub id (``lmms-lab-encoder/ChartQA``), read with ``datasets.load_dataset`` (online only);
- a local folder laid out like a hub repo (``data/test-00000-of-00001.parquet``, config
  sub-folders such as ``DocVQA/validation-*.parquet``, optionally a ``README.md`` whose front
  matter lists ``configs``), read with the same ``load_dataset`` call a hub id takes;
- a ``save_to_disk`` folder (``load_from_disk``);
- one parquet / arrow / jsonl / csv file.

Image columns (``datasets.Image``, also inside lists) come back undecoded, as ``{bytes, path}``
dicts, so images are decoded only where they are used (DataLoader workers, curation units).
A split that is not there falls back to the only split a dataset has; otherwise the error lists
the splits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class HFDataError(ValueError):
    """A dataset cannot be found or read; the message names the path and what to do."""


def looks_like_hub_id(path: str) -> bool:
    """``owner/name`` that is not a local path."""
    return not Path(path).exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))


def _no_decode(feature: Any) -> Any:
    """``feature`` with every ``datasets.Image`` inside it set to ``decode=False``."""
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, (datasets.Features, dict)):
        return type(feature)({k: _no_decode(v) for k, v in feature.items()})
    if isinstance(feature, datasets.List):
        return datasets.List(_no_decode(feature.feature), length=feature.length)
    if isinstance(feature, datasets.LargeList):
        return datasets.LargeList(_no_decode(feature.feature))
    if isinstance(feature, list):
        return [_no_decode(f) for f in feature]
    return feature


def lazy_images(ds):
    """The dataset with its image columns left encoded (``{bytes, path}`` per cell)."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        return ds.decode(False)
    features = _no_decode(ds.features)
    return ds if features == ds.features else ds.cast(features)


def _check_local_parquet(root: Path) -> None:
    """A clear error naming the file when a local parquet file is not parquet at all."""
    import pyarrow.parquet as pq

    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    for f in files:
        if f.suffix != ".parquet":
            continue
        try:
            pq.ParquetFile(f)
        except Exception as e:
            raise HFDataError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None


def _readme_configs(root: Path) -> bool:
    readme = root / "README.md"
    return readme.exists() and "\nconfigs:" in readme.read_text(encoding="utf-8", errors="replace")


def _load_local_folder(root: Path, config: str | None, streaming: bool):
    """A hub-layout folder: ``datasets`` resolves its splits and files (README configs, file naming
    conventions) as for a hub repo, then the files are loaded by their own builder. Loading the
    folder directly would cache by the folder's name alone, so two folders of the same name would
    return the first one's rows."""
    import datasets

    builder = datasets.load_dataset_builder(str(root), config)
    files = {split: list(f) for split, f in (builder.config.data_files or {}).items()}
    suffixes = {Path(f).suffix.lower() for fs in files.values() for f in fs}
    kinds = {FILE_BUILDERS.get(x) for x in suffixes}
    if not files or len(kinds) != 1 or None in kinds:
        raise HFDataError(f"{root}: no data files of one known type (found {sorted(suffixes) or 'none'})")
    return datasets.load_dataset(kinds.pop(), data_files=files, streaming=streaming)


def _load_any(path: str, config: str | None, streaming: bool):
    """A Dataset / DatasetDict (or their iterable forms) from a hub id or a local path."""
    import datasets

    p = Path(path)
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if streaming:
            if isinstance(ds, datasets.DatasetDict):
                return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in ds.items()})
            return ds.to_iterable_dataset()
        return ds
    if p.is_file():
        builder = FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise HFDataError(f"{p}: unknown data file type; give a .parquet, .arrow, .jsonl or .csv file")
        _check_local_parquet(p)
        return datasets.load_dataset(builder, data_files={"train": str(p)}, streaming=streaming)
    if p.is_dir():
        _check_local_parquet(p)
        if config and not _readme_configs(p) and (p / config).is_dir():
            p, config = p / config, None
        return _load_local_folder(p, config if _readme_configs(p) else None, streaming)
    if not looks_like_hub_id(path):
        raise HFDataError(f"{path}: no such file or folder (and not a hub id of the form owner/name)")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise HFDataError(
            f"{path}: not a local path, and HF_HUB_OFFLINE is set; download the dataset "
            f"(huggingface-cli download --repo-type dataset {path} --local-dir /data/{path.split('/')[-1]}) "
            "and pass its folder"
        )
    return datasets.load_dataset(path, config, streaming=streaming)


def load_hf(
    path: str | Path, *, split: str | None = None, config: str | None = None, streaming: bool = False
):
    """One split of a hub id or local copy, images undecoded (see the module docstring)."""
    import datasets

    path = str(path)
    try:
        ds = _load_any(path, config, streaming)
    except HFDataError:
        raise
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
        raise HFDataError(f"{path}: dataset not found ({e})") from None
    except ValueError as e:
        raise HFDataError(f"{path}: cannot load (config {config!r}): {e}") from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(ds)
        if split in ds:
            ds = ds[split]
        elif len(names) == 1:
            ds = ds[names[0]]
        else:
            raise HFDataError(f"{path}: no split {split!r}; splits here: {', '.join(names)}")
    return lazy_images(ds)


def iter_hf_rows(
    path: str | Path,
    columns: list[str],
    *,
    split: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    optional: tuple[str, ...] = (),
    streaming: bool = False,
) -> Iterator[tuple[dict[str, Any], int]]:
    """Rows ``(row, index)`` holding ``columns`` (a missing one is an error) and whichever of the
    ``optional`` columns the dataset has; images stay ``{bytes, path}`` dicts."""
    ds = load_hf(path, split=split, config=config, streaming=streaming)
    names = list(ds.column_names or ds.features or [])
    missing = [c for c in columns if c not in names]
    if missing:
        raise HFDataError(
            f"{path}: missing column(s) {missing}; found {sorted(names)}. "
            f"Expected the layout with columns {columns}"
        )
    ds = ds.select_columns(columns + [c for c in optional if c in names and c not in columns])
    for index, row in enumerate(ds):
        if limit is not None and index >= limit:
            return
        yield row, index
