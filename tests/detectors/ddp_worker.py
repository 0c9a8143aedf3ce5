"""Run by torchrun from test_ddp.py: train the tiny preset with DDP, dump each rank's weights."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_squares  # noqa: E402

from mgral.detectors.torchvision_detector import TorchvisionDetector  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
ds = make_squares(out / f"data{rank}", images=12)
det = TorchvisionDetector("tiny", ds.categories, device="cpu", seed=0, pretrained=False, train={"progress": False})
init = {k: v.clone() for k, v in det.model.state_dict().items()}
summary = det.fit(ds, ds.image_ids(), iterations=3, batch_size=2, checkpoint_dir=out / "ckpt")
preds = det.predict(ds, ds.image_ids())
torch.save(
    {"init": init, "final": det.model.state_dict(), "pred_ids": list(preds), "iterations": summary["iterations"]},
    out / f"rank{rank}.pt",
)
torch.distributed.destroy_process_group()
