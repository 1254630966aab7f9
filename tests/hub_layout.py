"""Writing datasets the way a hub dataset repo lays them out (for tests)."""

from __future__ import annotations

from pathlib import Path

import datasets
import yaml


def save_hub_layout(ds: datasets.DatasetDict, root: Path, config: str | None = None) -> Path:
    """Write ``ds`` as a hub dataset repo does: ``{config or data}/{split}-00000-of-00001.parquet``,
    with the README front matter listing each config and its data files."""
    folder = config or "data"
    readme = root / "README.md"
    configs = yaml.safe_load(readme.read_text().split("---")[1])["configs"] if readme.exists() else []
    files = []
    for split, d in ds.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        d.to_parquet(str(root / folder / f"{split}-00000-of-00001.parquet"))
        files.append({"split": split, "path": f"{folder}/{split}-*"})
    configs.append({"config_name": config or "default", "data_files": files})
    readme.write_text("---\n" + yaml.safe_dump({"configs": configs}) + "---\n")
    return root
