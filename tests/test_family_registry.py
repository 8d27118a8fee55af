"""The family registry: option tables composed and refused per family, one key declared one way."""

from __future__ import annotations

import re
import sys
import types

import pytest
from pydantic import Field

from difflora.errors import UserError
from difflora.models import registry
from difflora.models.plugin import FamilyPlugin
from difflora.models.shared_options import FlowMatchingKeys


def _plugin_module(monkeypatch, name: str, table) -> str:
    class Plugin(FamilyPlugin):
        names = (name,)
        title = f"{name} family"
        options = table

        def owns_lora_names(self, names, metadata):
            return False

        def load(self, path, **kwargs):
            raise AssertionError("not loaded in these tests")

    module = types.ModuleType(f"fake_{name}")
    module.PLUGIN = Plugin()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(registry, "FAMILIES", list(registry.FAMILIES))
    return module.__name__


def test_a_family_sharing_a_key_table_registers_and_one_declaring_a_key_another_way_is_refused(monkeypatch):
    class Shared(FlowMatchingKeys):
        pass

    registry.register_family(_plugin_module(monkeypatch, "shares", Shared))
    assert "shares" in registry.family_names()

    class Other(FlowMatchingKeys):
        discrete_flow_shift: float = Field(1.0, gt=0)  # FLUX's default is 3.0: the same key meaning another thing

    with pytest.raises(ValueError, match=r"job key discrete_flow_shift differs from [^;]+'s; one key means one thing"):
        registry.register_family(_plugin_module(monkeypatch, "differs", Other))


def test_a_key_only_other_families_declare_is_refused_naming_them_unless_it_keeps_its_default():
    sd = registry.plugin_for("sd1")
    with pytest.raises(UserError, match=r"^job.toml: blocks_to_swap applies to [^;]*FLUX\.1 / [^;]+ models only; "
                                        r"this model is Stable Diffusion 1.x / 2.x$"):
        registry.family_options(sd, {"blocks_to_swap": 4}, "job.toml")
    assert registry.family_options(sd, {"blocks_to_swap": None}, "job.toml").model_dump() == {}
    flux = registry.plugin_for("flux")
    table = registry.family_options(flux, {"blocks_to_swap": 4, "guidance_scale": 2.0})
    assert (table.blocks_to_swap, table.guidance_scale, table.timestep_sampling) == (4, 2.0, "sigma")
    with pytest.raises(UserError, match="--blocks-to-swap: Input should be greater than or equal to 0"):
        registry.family_options(flux, {"blocks_to_swap": -1}, key_label=lambda k: "--" + k.replace("_", "-"))


def test_generate_refuses_a_flag_of_another_family_naming_the_flag(tiny_sd1_dir, tmp_path, run_cli):
    code, _, err = run_cli("generate", "--model", tiny_sd1_dir, "--prompt", "a face", "--guidance-scale", 2,
                           "--out", tmp_path / "out")
    assert code == 2 and err.startswith(f"difflora: error: {tiny_sd1_dir}: --guidance-scale applies to ")
    assert re.search(r"applies to [^;]*FLUX\.1[^;]* models only; this model is Stable Diffusion 1.x / 2.x$", err.strip())
    assert not (tmp_path / "out").exists()
