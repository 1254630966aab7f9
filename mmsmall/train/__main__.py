"""``python -m mmsmall.train CONFIG [key=value ...]`` (what launch/train.sh runs on every rank)."""

import sys

from mmsmall.config import ConfigError
from mmsmall.train.loop import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:  # a user error: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
