"""The worker side of lrctl: attach a training job and serve its learning rates."""

from lrctl.server.attach import LRControl, attach
from lrctl.server.controller import Controller
from lrctl.server.optim import build_optimizer

__all__ = ["Controller", "LRControl", "attach", "build_optimizer"]
