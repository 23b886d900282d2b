"""A deterministic training job for the replay tests (run as a subprocess).

    python tests/replay_worker.py DIR [STEPS] [--window W] [--save-at N]
                                  [--resume FILE [--load before|after]]

Trains a small MLP with AdamW on CPU with fixed seeds, under lrctl served on a free
loopback port (first stdout line: "serving on ADDRESS"). $LRCTL_REPLAY and
$LRCTL_AUDIT_LOG work as for any job (attach reads them); --window is attach's
replay_window. Gates, files in DIR: it takes its first step once DIR/go exists;
without STEPS it trains until DIR/release exists, with STEPS until that many steps
are done. --save-at N stops after N steps and saves DIR/checkpoint.pt (model,
optimizer, the data generator, the step); --resume FILE starts from one, its optimizer
state loaded after attach (default) or before. It then writes DIR/rates.json (per step
it took, name -> the rate that step used, read from the optimizer's param groups),
DIR/weights.pt and DIR/steps, and keeps serving until DIR/exit exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

from lrctl.server import attach

torch.set_num_threads(1)


def used_rates(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    lr_of = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    return {n: lr_of[id(p)] for n, p in model.named_parameters()}


def wait_file(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("steps", type=int, nargs="?")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--load", choices=("before", "after"), default="after")
    args = parser.parse_args()
    out, steps = args.dir, args.steps if args.save_at is None else args.save_at
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW([
        {"params": model[0].parameters(), "lr": 0.01},
        {"params": model[2].parameters(), "lr": 0.02},
        {"params": model[4].parameters(), "lr": 0.005},
    ], weight_decay=0.01)
    data = torch.Generator().manual_seed(1)
    step = 0
    checkpoint = None if args.resume is None else torch.load(args.resume)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        data.set_state(checkpoint["data"])
        step = checkpoint["step"]
        if args.load == "before":
            optimizer.load_state_dict(checkpoint["optimizer"])
    ctl = attach(model, optimizer, address="127.0.0.1:0", replay_window=args.window)
    if checkpoint is not None and args.load == "after":
        optimizer.load_state_dict(checkpoint["optimizer"])
    print(f"serving on {ctl.address}", flush=True)
    table = []
    with ctl:
        wait_file(os.path.join(out, "go"))
        while (steps is None and not os.path.exists(os.path.join(out, "release"))) or (
                steps is not None and step < steps):
            x = torch.randn(32, 8, generator=data)
            y = torch.randn(32, 4, generator=data)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            table.append(used_rates(model, optimizer))
            step += 1
            time.sleep(0.002)  # pacing only: live changes land somewhere in the run
        if args.save_at is not None:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "data": data.get_state(), "step": step}, os.path.join(out, "checkpoint.pt"))
        with open(os.path.join(out, "rates.json"), "w") as f:
            json.dump(table, f)
        torch.save(model.state_dict(), os.path.join(out, "weights.pt"))
        with open(os.path.join(out, "steps.tmp"), "w") as f:
            f.write(str(step))
        os.replace(os.path.join(out, "steps.tmp"), os.path.join(out, "steps"))  # seen whole
        print(f"trained {step} steps; replay report: {ctl.replay_report}", flush=True)
        wait_file(os.path.join(out, "exit"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
