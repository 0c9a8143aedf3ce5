import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_process_gloo_training_keeps_ranks_in_agreement(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(worker),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["iterations"] == r1["iterations"] == 3
    changed = 0
    for k, v in r0["final"].items():
        assert torch.equal(v, r1["final"][k]), f"ranks disagree on {k}"
        changed += not torch.equal(v, r0["init"][k])
    assert changed > 0, "training did not change any weight"
    # pool prediction is sharded by rank and gathered: both ranks hold every image
    assert r0["pred_ids"] == r1["pred_ids"] == list(range(12))
    # rank 0 alone wrote the checkpoint
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.pt"]
