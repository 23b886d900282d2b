"""A short run to draw with `lrctl plot` (the picture in docs/plot.png).

Trains a small MLP on a synthetic regression for 600 steps under lrctl, with its audit
log in OUT_DIR/audit.jsonl and its loss in OUT_DIR/metrics.ndjson (the lines `lrctl
watch --json` writes), while a client changes rates at known steps: a warmup + cosine
schedule on the encoder, a base change and a pin on the head, a scale.

    python examples/plot_example.py /tmp/run
    lrctl plot docs/plot.png --file /tmp/run/audit.jsonl --metrics /tmp/run/metrics.ndjson

Needs lrctl[worker].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from lrctl.client.client import LRClient
from lrctl.common.schedules import Warmup
from lrctl.server import attach, build_optimizer

STEPS = 600


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.jsonl").unlink(missing_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh()))
    model.add_module("head", nn.Linear(32, 1))
    optimizer = build_optimizer(model, torch.optim.SGD, {"encoder.*": 0.05, "head.*": 0.02}, default_lr=0.05)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(512, 1)
    with attach(model, optimizer, address="127.0.0.1:0", audit_log=str(out / "audit.jsonl")) as ctl, \
            LRClient(ctl.address, timeout=30) as client, open(out / "metrics.ndjson", "w") as metrics:
        client.set_schedules({"encoder.*": Warmup(warmup_steps=50, decay="cosine", total_steps=550)},
                             at_step=20, wait=False, reason="warmup + cosine")
        client.set_learning_rates({"head.weight": 0.1, "head.bias": 0.1}, at_step=120, wait=False,
                                  reason="faster head")
        client.pin_learning_rates({"head.bias": 0.005}, at_step=260, wait=False, reason="hold the bias")
        client.scale_learning_rates("encoder.2.*", 0.3, at_step=330, wait=False, reason="calm layer 2")
        client.unpin("head.bias", at_step=420, wait=False)
        for step in range(STEPS):
            batch = torch.randint(0, len(x), (64,))
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            metrics.write(json.dumps({"step": step, "metrics": {"loss": loss.item()}}) + "\n")
    print(f"wrote {out / 'audit.jsonl'} and {out / 'metrics.ndjson'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "plot-run"))
