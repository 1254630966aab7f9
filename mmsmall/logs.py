"""Logging set-up shared by the entry points: our loggers at INFO, third-party ones quiet.

Libraries we call log at INFO through the root logger (open_clip's "Parsing model identifier")
or their own (DeepSpeed); those lines flood a run's output. Unless verbose (``mmsmall -v``, or
``MMSMALL_VERBOSE=1``, which child processes inherit), the root logger passes warnings only
while mmsmall's own loggers keep their INFO lines.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "MMSMALL_VERBOSE"
OUR_LOGGERS = ("mmsmall", "eval", "data_tools")
FORMAT = "%(asctime)s %(name)s: %(message)s"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def set_verbose(on: bool) -> None:
    """Turn verbose logging on for this process and every process it starts."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def setup_logging(level: int = logging.INFO) -> None:
    """Our loggers at ``level``; everyone else's at WARNING unless verbose (then at ``level`` too)."""
    logging.basicConfig(level=level if verbose() else max(level, logging.WARNING), format=FORMAT)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose():
        logging.getLogger("DeepSpeed").setLevel(max(level, logging.WARNING))
