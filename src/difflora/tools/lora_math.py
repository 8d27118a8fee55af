"""Moved to difflora.network.lowrank (shared by the methods and the tools); kept until the methods import it there."""

from ..network.lowrank import combine_exact, svd_rerank  # noqa: F401
