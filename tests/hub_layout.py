"""Writing datasets the way a hub dataset repo lays them out (for tests)."""

from __future__ import annotations

from pathlib import Path

import datasets
import yaml


def card_features(card_yaml: str) -> datasets.Features:
    """The ``datasets.Features`` a dataset card's ``dataset_info.features`` YAML declares, read by the
    same code ``datasets`` runs on a hub README (``list:`` of a struct -> a list of dicts, ``sequence:``
    of a struct -> a dict of lists), so a fixture's column types are the ones the hub set yields."""
    return datasets.Features._from_yaml_list(yaml.safe_load(card_yaml)["features"])


def save_hub_layout(
    ds: datasets.DatasetDict, root: Path, config: str | None = None, card_yaml: str | None = None
) -> Path:
    """Write ``ds`` as a hub dataset repo does: ``{config or data}/{split}-00000-of-00001.parquet``,
    with the README front matter listing each config and its data files, and, given ``card_yaml``
    (the card's ``dataset_info`` block), that ``dataset_info`` with this copy's split sizes."""
    folder = config or "data"
    readme = root / "README.md"
    meta = yaml.safe_load(readme.read_text().split("---")[1]) if readme.exists() else {}
    files = []
    for split, d in ds.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        d.to_parquet(str(root / folder / f"{split}-00000-of-00001.parquet"))
        files.append({"split": split, "path": f"{folder}/{split}-*"})
    meta.setdefault("configs", []).append({"config_name": config or "default", "data_files": files})
    if card_yaml is not None:
        info = yaml.safe_load(card_yaml)
        info["splits"] = [
            {"name": s, "num_bytes": d.data.nbytes, "num_examples": len(d)} for s, d in ds.items()
        ]
        meta["dataset_info"] = info
    readme.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n")
    return root
