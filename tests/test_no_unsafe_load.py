"""Nothing in the project unpickles arbitrary objects: every torch.load passes weights_only=True."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_torch_load_is_weights_only():
    calls = []
    for pkg in ("mmsmall", "data_tools", "eval"):
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                end = text.find(")", m.end())
                calls.append((path, text[m.start() : end + 1]))
    assert calls, "expected at least one torch.load call to check (checkpoint resume, export)"
    unsafe = [f"{p.relative_to(ROOT)}: {c}" for p, c in calls if "weights_only=True" not in c]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_no_private_numpy_and_an_existing_checkpoint_still_resumes():
    """Checkpoints read numpy's RNG state through public numpy only; ``data/client_rank00000.pt``
    was written by ``checkpoint.save``'s code (RNG state right after seeding everything with 7)."""
    import random

    import numpy as np
    import torch

    from mmsmall.train.checkpoint import _read_client, set_rng_state

    private = [
        f"{p.relative_to(ROOT)}" for pkg in ("mmsmall", "data_tools", "eval") for p in (ROOT / pkg).rglob("*.py")
        if re.search(r"\b(np|numpy)\.(_core|core)\b", p.read_text())
    ]  # fmt: skip
    assert not private, f"numpy's private modules used in {private}"
    client = _read_client(ROOT / "tests" / "data" / "client_rank00000.pt")
    assert client["step"] == 5
    set_rng_state(client["rng"])
    resumed = (np.random.rand(), random.random(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert resumed == (np.random.rand(), random.random(), torch.rand(1).item())
