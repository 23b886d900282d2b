"""A change record's plain values and the ChangeRecord built from them (lrctl.server.record_wire).

The serving process builds the records a WatchMetrics stream carries from plain values
the training thread sends; these tests hold that message to the record itself and to
the controller's own per-name changes (RateChanges), for every kind of record: base
and pin changes, schedules, a failed change, a change due at a step, a cut to a limit.
"""

from __future__ import annotations

import marshal
import math

import torch
from torch import nn

from lrctl.common.schedules import StepDecay
from lrctl.server import attach
from lrctl.server.record_wire import record_pb, record_to_wire
from lrctl.server.requests import ChangeRequest, Mode, ScheduleUpdate, Target, Update
from lrctl.server.write_messages import schedules_pb, updates_pb


def _expected(ctl, record, per_record):  # type: ignore[no-untyped-def]
    """The record's fields, and its per-name changes as the controller lists them."""
    rows = [(c.name, c.old_lr, c.new_lr, c.old_base, c.new_base, c.old_pin, c.new_pin, c.old_schedule,
             c.new_schedule) for c in ctl.controller.rate_changes(record, per_record)]
    return (record.change_id, record.version, record.step, record.applied_at, record.requested_at,
            [m.SerializeToString() for m in updates_pb(record.updates)],
            [m.SerializeToString() for m in schedules_pb(record.schedules)],
            rows, record.peer, record.user, record.reason, record.at_step, record.num_changes,
            record.role, record.token, record.status, record.error)


def _got(message):  # type: ignore[no-untyped-def]
    rows = [(c.name, c.old_lr, c.new_lr, c.old_base, c.new_base,
             c.old_pin if c.HasField("old_pin") else None, c.new_pin if c.HasField("new_pin") else None,
             c.old_schedule, c.new_schedule) for c in message.changes]
    return (message.change_id, message.version, message.step, message.applied_at, message.requested_at,
            [m.SerializeToString() for m in message.updates], [m.SerializeToString() for m in message.schedules],
            rows, message.peer, message.user, message.reason,
            message.at_step if message.HasField("at_step") else None, message.num_changes,
            message.role, message.token_name, message.status, message.error)


def test_every_kind_of_record_travels_as_plain_values_whole() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = attach(model, optimizer, address="127.0.0.1:0")
    try:
        submit = ctl.controller.submit
        submit(ChangeRequest((Update("*", 0.5, Mode.SCALE),), reason="halve", peer="ipv4:1", user="ann"))
        submit(ChangeRequest((Update("0.bias", 0.02, target=Target.PIN),
                              Update("1.*", 3.0, Mode.SCALE, Target.PIN)), role="writer", token="ci"))
        submit(ChangeRequest((), schedules=(ScheduleUpdate("1.*", StepDecay(step_size=2, gamma=0.5)),),
                             at_step=1))
        submit(ChangeRequest((Update("0.bias", 0, Mode.UNPIN, Target.PIN),), expected_version=0))  # fails
        for _ in range(3):
            optimizer.step()
        records = ctl.controller.history(-1, 100)[0]
        assert [r.failed for r in records] == [False, False, True, False]
        assert any(r.schedules for r in records) and any(r.plan and r.plan.old_pin for r in records)
        for record in records:
            for per_record in (1, 3, 100):
                wired = marshal.loads(marshal.dumps(record_to_wire(record, ctl.controller.names, per_record)))
                assert _got(record_pb(wired, per_record)) == _expected(ctl, record, per_record)
        # A record's per-name changes cut to what the wire carries (the most a stream asked for).
        wired = record_to_wire(records[0], ctl.controller.names, 2)
        assert len(record_pb(wired, 100).changes) == 2 and record_pb(wired, 100).num_changes == 4
        # No pin is an unset field, not NaN.
        pins = [c for c in record_pb(record_to_wire(records[1], ctl.controller.names, 10), 10).changes]
        assert not any(c.HasField("old_pin") for c in pins) and all(not math.isnan(c.new_pin) for c in pins)
    finally:
        ctl.close(grace=0.5)
