"""Test-only families join the contract suite (tiny_families.TEST_FAMILIES): registered around each contract test
and gone afterwards, so the rest of the session sees the registry as the package has it."""

import pytest
from tiny_families import TEST_FAMILIES

from difflora.models import registry


@pytest.fixture(autouse=True)
def test_families(monkeypatch):
    monkeypatch.setattr(registry, "FAMILIES", list(registry.FAMILIES))
    for module in TEST_FAMILIES.values():
        registry.register_family(module)
