"""``python -m mmsmall.train CONFIG [key=value ...]`` (what launch/train.sh runs on every rank)."""

import sys

from mmsmall.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
