"""The one rule that groups tar members into samples, shared by the curation reader and the training reader.

As in webdataset: a sample's key is the member's whole path up to the first dot of its file name,
so ``red/0001.jpg`` and ``blue/0001.jpg`` are two samples, and ``0001.seg.png`` has extension
``seg.png``. Keys are never used as file-system paths.
"""

from __future__ import annotations


def member_key(name: str) -> tuple[str, str] | None:
    """``(key, ext)`` of a tar member name, ext lower-cased; None for a name with no extension."""
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()
