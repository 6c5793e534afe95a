"""A callback for the DDP test: what each rank trained on, and a hash of its final weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SeenIds(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.ids: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids += list(batch["ids"])

    def on_train_end(self, trainer, pl_module):
        h = hashlib.sha256()
        for name, p in sorted(pl_module.policy.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = {"rank": trainer.global_rank, "world": trainer.world_size, "ids": self.ids, "weights": h.hexdigest()}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))
