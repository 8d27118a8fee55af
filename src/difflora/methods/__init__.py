"""Training methods. Each is one module with its option table and a loss that reads in one screen.

METHODS is the registry: config.py builds the job schema from it (each method's `options`
becomes the job table named after it), the loop builds the method from it.
"""

from __future__ import annotations

from .addift import Addift
from .base import Batch, DataSizes, Method, Stage, StepContext
from .copier import Copier
from .differential import Differential
from .edit import Edit, EditSlider
from .per_pair import PerPairAverage
from .slider import Slider
from .standard import Standard

METHODS: dict[str, type[Method]] = {m.name: m for m in (Standard, Copier, Addift, Slider, Differential, Edit,
                                                       EditSlider)}


def make_method(job) -> Method:
    method = METHODS[job.method](job)
    if job.per_pair_average:
        method = PerPairAverage(job, method)
    return method


__all__ = ["Batch", "DataSizes", "Method", "Stage", "StepContext", "METHODS", "make_method"]
