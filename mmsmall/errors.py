"""Errors that are the user's to fix, raised with a message that says what, where and what to do.

``mmsmall`` prints them as one line and exits 2 (``mmsmall.cli``). They subclass the builtin
errors, so ``except FileNotFoundError`` still catches them; a plain ``FileNotFoundError`` (a bug,
or a file the code itself should have written) is not one of them and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class MissingInput(FileNotFoundError):
    """A file or folder the user named is missing, or is not the kind the command reads."""


class OutputExists(FileExistsError):
    """An output folder the user named already holds files (and ``--overwrite`` was not given)."""


class InputTooLong(ValueError):
    """A prompt the user gave does not fit the model's positions (``max_position_embeddings``)."""


class AdapterBaseMismatch(ValueError):
    """An adapter-only export is being put on a base model other than the one it was trained on."""


def refuse_non_empty(out: Path, command: str, overwrite: bool) -> None:
    """Raise :class:`OutputExists` when the folder ``out`` holds files and ``overwrite`` is off
    (export and import: a previous release or import is never replaced by accident)."""
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExists(
            f"{out} is not empty; {command} into a new or empty folder, or pass --overwrite to replace "
            f"the {command}ed files there (other files are left alone)"
        )
