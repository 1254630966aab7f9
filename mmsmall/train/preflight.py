"""``python -m mmsmall.train.preflight CONFIG [key=value ...]``: the checks a run must pass before
any process starts, in one short Python process (launch/train.sh runs it before the DeepSpeed
launcher, so a mistake costs a second, not a launcher start and a rank's traceback).

Refused, each in one line with exit code 2: config errors (unknown keys, wrong types, values
out of range), missing data or unknown models (``inputs.require_training_inputs``), an
``out_dir`` that is a file or that another live run holds (``runlock.probe``), an ``init_from``
that is not a saved model folder, and ``model.*`` settings a later stage cannot apply
(``stage``). The trainer runs the same checks on every rank (``check_run``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmsmall.config import ConfigError, RunConfig, load_config
from mmsmall.train import runlock, stage
from mmsmall.train.inputs import require_training_inputs


def check_run(
    config: str | Path, overrides: list[str], probe_lock: bool = True
) -> tuple[RunConfig, list[str]]:
    """The run config and the ``model.*`` keys it sets itself; ConfigError on anything that
    would fail (or be silently ignored) once the run started."""
    cfg = load_config(config, overrides)
    require_training_inputs(cfg)
    keys = stage.explicit_model_keys(config, overrides)
    stage.resolve_point_format(cfg)  # data.point_format: the run's own, else the model's
    if cfg.train.init_from and "point_format" in keys:
        raise ConfigError(
            "model.point_format: with train.init_from it is the folder's (the pointing text the model "
            "was trained in); set data.point_format=molmo|molmo2 to choose the text this run trains in"
        )
    if cfg.train.init_from:
        stage.stage_model(stage.folder_model_config(cfg.train.init_from), cfg.model, keys)
    if probe_lock:
        runlock.probe(cfg.out_dir)
    return cfg, keys


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m mmsmall.train.preflight CONFIG [key=value ...]", file=sys.stderr)
        return 2
    try:
        check_run(argv[0], argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
