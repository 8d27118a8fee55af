"""Training methods. Each is one module with a loss that reads in one screen."""

from __future__ import annotations

from .addift import Addift
from .base import Batch, Method, Stage, StepContext
from .copier import Copier
from .differential import Differential
from .per_pair import PerPairAverage
from .slider import Slider
from .standard import Standard

METHODS = {"standard": Standard, "copier": Copier, "addift": Addift, "slider": Slider, "differential": Differential}


def make_method(job) -> Method:
    method = METHODS[job.method](job)
    if job.per_pair_average:
        method = PerPairAverage(job, method)
    return method


__all__ = ["Batch", "Method", "Stage", "StepContext", "METHODS", "make_method"]
