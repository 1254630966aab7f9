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
