"""The template family (tests/template_family/) joins the contract suite like any registered family: its
registration here, its TinyFamily entry in tiny_families.py."""

from difflora.models import registry

if "template" not in registry.family_names():
    registry.register_family("template_family")
