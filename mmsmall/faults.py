"""Fault injection for the crash tests, kept out of the user's config: read from the environment here only.

MMSMALL_TEST_KILL_AT_STEP=N       training: SIGKILL the process right after step N (and its checkpoint)
MMSMALL_TEST_KILL_DURING_SAVE=1   with it: die inside step N's save instead (files written, no marker)
MMSMALL_TEST_HOLD=N:PATH          training: after step N, wait until PATH exists (a run held alive
                                  while a test starts another into its out_dir)
DATA_TOOLS_UNIT_DELAY_S=x         curation: each unit waits x seconds (widens a test's kill window)
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def kill_at_step() -> int:
    """The step after which training kills itself (0: never)."""
    return int(os.environ.get("MMSMALL_TEST_KILL_AT_STEP", "0") or 0)


def kill_during_save() -> bool:
    return os.environ.get("MMSMALL_TEST_KILL_DURING_SAVE", "0") == "1"


def unit_delay_s() -> float:
    return float(os.environ.get("DATA_TOOLS_UNIT_DELAY_S", "0") or 0)


def hold_after(step: int) -> None:
    """Wait after ``step`` until MMSMALL_TEST_HOLD's file exists (returns at once without it)."""
    at, _, path = os.environ.get("MMSMALL_TEST_HOLD", "").partition(":")
    if at and int(at) == step:
        while not Path(path).exists():
            time.sleep(0.1)
