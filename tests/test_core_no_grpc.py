"""The controller, the planner, the rate table, the strategy, the schedules, the guardrails and the
checkpoint code import and work with grpc made unimportable: the transport stays at
the edges (server/service.py, server/status.py, the client), as the client side proves
the same for torch (test_client_no_torch.py).

A subprocess blocks every import of grpc (and protobuf's generated stubs, which only
the wire needs), attaches a controller without serving, sets a schedule, trains a few
steps, checkpoints and resumes, and prints what it saw.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")

CHILD = r"""
import json, sys

class BlockGrpc:
    '''Fails every import of grpc or the generated stubs, as if they were not installed.'''
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("grpc", "grpc_health", "grpc_reflection") or name.startswith("lrctl.v1"):
            self.attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, BlockGrpc())

import torch
from torch import nn
from lrctl.common.errors import FailedPreconditionError, InvalidArgumentError
from lrctl.common.schedules import Warmup
from lrctl.server.adopt import AdoptedScheduler
from lrctl.server.controller import Controller
from lrctl.server.guardrails import Guardrails
from lrctl.server.planner import plan_change
from lrctl.server.write_plan import WritePlanner
from lrctl.server.requests import ChangeRequest, Mode, ScheduleUpdate, Target, Update
from lrctl.server.resume import Resume
from lrctl.server.strategy import CoalescedGroups
from lrctl.server.param_stats import ParamStats
from lrctl.server.telemetry import check_metrics
from lrctl.server.watch import WatchHub

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
ctl = Controller(model.named_parameters(), opt)
resume = Resume(ctl, opt, None, "checkpoint")
ctl.submit(ChangeRequest((Update("0.weight", 0.2),), (ScheduleUpdate("*", Warmup(warmup_steps=4)),)))
ctl.submit(ChangeRequest((Update("1.bias", 0.05, Mode.ABSOLUTE, Target.PIN),), at_step=2))
seen = []
opt.register_step_pre_hook(lambda o, a, k: seen.append(sorted(g["lr"] for g in o.param_groups)))
for _ in range(6):
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    opt.zero_grad()
try:
    ctl.submit(ChangeRequest((Update("0.weight", float("nan")),)))
    refused = None
except InvalidArgumentError as exc:
    refused = str(exc)
guarded = Controller(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1),
                     guardrails=Guardrails.parse("0.*=..0.5", "10"))
try:
    guarded.submit(ChangeRequest((Update("0.weight", 0.6),)))
    railed = None
except FailedPreconditionError as exc:
    railed = str(exc)
guarded.close()
saved = opt.state_dict()
fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
ctl2 = Controller(model.named_parameters(), fresh)
resume2 = Resume(ctl2, fresh, None, "checkpoint")
fresh.load_state_dict(saved)
print(json.dumps({
    "blocked": sorted(set(BlockGrpc.attempts)),
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in ("grpc", "google")),
    "seen": seen,
    "refused": refused,
    "railed": railed,
    "resumed": [ctl2.step, ctl2.version, ctl2.learning_rates() == ctl.learning_rates()],
}))
"""


def test_core_runs_without_grpc() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], out["loaded"]  # neither grpc nor protobuf got in
    assert out["refused"] and "nan" in out["refused"]
    assert out["railed"] == "0.weight: base 0.6 is above the guardrail max 0.5 of '0.*'"
    # Warmup factor s/4 on bases 0.1 (and 0.2 for 0.weight); the pin holds 0.05 from step 2.
    assert out["seen"][0] == [0.0, 0.0]
    assert out["seen"][1] == [0.025, 0.05]
    assert out["seen"][3] == [0.05, 0.07500000000000001, 0.15000000000000002]
    assert out["seen"][5] == [0.05, 0.1, 0.2]
    assert out["resumed"] == [6, 2, True]
