"""Every way a lab starts training, on one machine: each run trains 2 steps and saves the model.

- ``two_nodes``: launch/train.sh with ``HOSTFILE`` (two nodes, one slot each) and ``NODE_RANK``
  0 and 1, i.e. DeepSpeed's launcher with ``--no_ssh --node_rank``, master 127.0.0.1;
- ``no_python``: ``deepspeed --no_python launch/train.sh CONFIG ...`` (train.sh sees RANK set
  and runs the trainer in that process);
- ``torchrun``: ``torchrun -m mmsmall.train CONFIG ...``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import ROOT, _env, _losses, shards  # noqa: F401  (shards: the module's fixture)

BIN = Path(sys.executable).parent


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["two_nodes", "no_python", "torchrun"])
def test_launcher_trains_and_saves(tmp_path, shards, how):  # noqa: F811
    out = tmp_path / "run"
    args = [
        "configs/train/tiny-pretrain.yaml",
        f"out_dir={out}",
        f"data.train=[{{path: {shards}}}]",
        "train.steps=2",
        "train.grad_accum=1",
        "train.save_every=0",
        "train.tensorboard=false",
    ]
    env, port = _env(1), _port()
    if how == "two_nodes":
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
        env |= {"HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmds = [(["bash", "launch/train.sh", *args], env | {"NODE_RANK": str(r)}) for r in range(2)]
    elif how == "no_python":
        ds = [str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", port, "--no_python"]
        cmds = [([*ds, "launch/train.sh", *args], env)]
    else:
        tr = [str(BIN / "torchrun"), "--nproc_per_node", "1", "--master_port", port, "-m", "mmsmall.train"]
        cmds = [([*tr, *args], env)]
    logs = [tmp_path / f"{how}.{i}.log" for i in range(len(cmds))]
    files = [log.open("w") for log in logs]
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT)
        for (c, e), f in zip(cmds, files, strict=True)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    for f in files:
        f.close()
    assert codes == [0] * len(procs), logs[0].read_text()[-5000:]
    assert sorted(_losses(out)) == [1, 2]
    assert (out / "model" / "model.safetensors").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    world = 2 if how == "two_nodes" else 1
    assert sorted(p.name for p in out.glob("samples_rank*.jsonl")) == [
        f"samples_rank{r:05d}.jsonl" for r in range(world)
    ]
