"""The base of every option table (the job, the dataset levels, each method's table).

Its own module so that the method modules, which own their option tables, and config.py,
which assembles the job schema from them, do not import each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are refused (a misspelt key never silently does nothing); assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
