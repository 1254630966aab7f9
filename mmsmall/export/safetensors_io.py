"""Sharded safetensors with a sha256 manifest: write, verify, load.

A release folder holds ``model.safetensors`` (one shard) or ``model-00001-of-0000N.safetensors``
plus ``model.safetensors.index.json`` (Hugging Face's layout), and ``checksums.json``::

    {"algorithm": "sha256", "files": {"model.safetensors": {"sha256": "...", "bytes": 1234}}}

Loading only ever reads safetensors. Before reading, every shard listed in ``checksums.json`` is
checked for size (a truncated copy) and hash (a tampered copy); either fails with
:class:`ShardIntegrityError` naming the file.

Every weight file we write goes through :func:`save_safetensors` (or, for folders transformers
writes, :func:`umask_mode` afterwards): safetensors creates its files 0600, and weights must get
the mode every other new file gets under the umask (0644 under the usual 022).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file, save_model

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CHECKSUMS_NAME = "checksums.json"
MAX_SHARD_BYTES = 5 * 1000**3  # 5 GB, Hugging Face's default shard limit


class ShardIntegrityError(RuntimeError):
    """A weight file is missing, truncated, tampered with, or not valid safetensors."""


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(*paths: str | Path) -> None:
    """Give ``paths`` the mode a new file gets under the umask (``0o666 & ~umask``)."""
    mode = 0o666 & ~_umask()
    for p in paths:
        os.chmod(p, mode)


def save_safetensors(
    tensors: dict[str, torch.Tensor] | torch.nn.Module,
    path: str | Path,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write one safetensors file (a state dict, or a module through ``save_model``, which drops
    tied duplicates) with the umask's file mode; the one writer of weight files in mmsmall."""
    if isinstance(tensors, torch.nn.Module):
        save_model(tensors, str(path), metadata=metadata)
    else:
        save_file(tensors, str(path), metadata=metadata)
    umask_mode(path)
    return Path(path)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Group keys (in order) into shards of at most ``max_shard_bytes``; a lone bigger tensor gets its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state_dict.items():
        n = _tensor_bytes(t)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_sharded(
    state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``state_dict`` as safetensors shards (+ index when more than one) and ``checksums.json``.

    Tensors are made contiguous and de-aliased (tied weights are written as separate copies, which
    safetensors requires). Returns the shard paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    groups = plan_shards(clean, max_shard_bytes)
    meta = {"format": "pt", **(metadata or {})}
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(groups, start=1):
        name = SINGLE_NAME if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_safetensors({k: clean[k] for k in keys}, out_dir / name, metadata=meta)
        paths.append(out_dir / name)
        weight_map.update(dict.fromkeys(keys, name))
    if len(groups) > 1:
        total = sum(_tensor_bytes(t) for t in clean.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    write_checksums(out_dir)
    return paths


def shard_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a folder: from its index when there is one, else ``model.safetensors``."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ShardIntegrityError(f"{index}: not a valid safetensors index ({e})") from e
        return [model_dir / n for n in sorted(set(weight_map.values()))]
    single = model_dir / SINGLE_NAME
    if single.exists():
        return [single]
    raise ShardIntegrityError(
        f"{model_dir}: no {SINGLE_NAME} and no {INDEX_NAME}; is this a model folder written by "
        "`mmsmall export` or save_pretrained?"
    )


def weights_fingerprint(model_dir: str | Path, edge: int = 1 << 20) -> str:
    """A cheap identity of a model folder's weights: sha256 over each weight file's name, size and
    first and last ``edge`` bytes (the safetensors header, which lists every tensor, and both ends
    of the data), so a 16 GB base is told apart in milliseconds, not by reading all of it."""
    h = hashlib.sha256()
    for p in shard_files(model_dir):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}\n".encode())
        with open(p, "rb") as f:
            h.update(f.read(edge))
            f.seek(max(0, size - edge))
            h.update(f.read(edge))
    return h.hexdigest()


def write_checksums(model_dir: str | Path) -> Path:
    """Record size and sha256 of the model's own shards (its index, else ``model.safetensors``) in
    ``checksums.json``; other ``*.safetensors`` in the folder are not part of the release."""
    model_dir = Path(model_dir)
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in shard_files(model_dir)}
    path = model_dir / CHECKSUMS_NAME
    path.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2) + "\n")
    return path


def verify_shards(model_dir: str | Path, require_checksums: bool = False) -> list[Path]:
    """Check every shard of ``model_dir`` before it is read; returns the shard paths.

    With ``checksums.json``: each shard must exist with the recorded size and sha256. Without it
    (a checkpoint from elsewhere) each shard must at least have a readable safetensors header.
    """
    model_dir = Path(model_dir)
    shards = shard_files(model_dir)
    manifest_path = model_dir / CHECKSUMS_NAME
    if not manifest_path.exists():
        if require_checksums:
            raise ShardIntegrityError(f"{model_dir}: {CHECKSUMS_NAME} is missing; re-export the model")
        for p in shards:
            _check_header(p)
        return shards
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ShardIntegrityError(f"{manifest_path}: unreadable checksum manifest ({e})") from e
    for p in shards:
        if not p.exists():
            raise ShardIntegrityError(f"{p}: weight shard is missing (listed in {INDEX_NAME})")
        entry = recorded.get(p.name)
        if entry is None:
            raise ShardIntegrityError(
                f"{p}: not listed in {manifest_path}; the folder was modified after export"
            )
        size = p.stat().st_size
        if size != entry["bytes"]:
            raise ShardIntegrityError(
                f"{p}: truncated or resized: {size} bytes on disk, {entry['bytes']} recorded in "
                f"{CHECKSUMS_NAME}; copy the file again"
            )
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise ShardIntegrityError(
                f"{p}: sha256 mismatch ({digest[:16]}... on disk, {entry['sha256'][:16]}... recorded in "
                f"{CHECKSUMS_NAME}); the file was altered or corrupted, do not load it"
            )
    return shards


def _check_header(path: Path) -> None:
    if not path.exists():
        raise ShardIntegrityError(f"{path}: weight shard is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise ShardIntegrityError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated"
        ) from e


def load_sharded(
    model_dir: str | Path, require_checksums: bool = False, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Verify (unless the caller just did), then read all shards of ``model_dir`` into one CPU
    state dict (safetensors only)."""
    out: dict[str, torch.Tensor] = {}
    shards = (
        verify_shards(model_dir, require_checksums=require_checksums) if verify else shard_files(model_dir)
    )
    for p in shards:
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise ShardIntegrityError(f"{p}: could not read safetensors data ({e})") from e
    return out
