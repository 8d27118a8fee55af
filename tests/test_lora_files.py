"""LoRA files: kohya layout, metadata, hashes, peft input, damaged files."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflora.errors import UserError
from difflora.toy.tiny import build_tiny_sd
from difflora.network.files import load_lora, save_lora, sshs_hashes
from difflora.network.lora import LoRANetwork, NetworkSpec


@pytest.fixture(scope="module")
def net_and_model():
    model = build_tiny_sd("sd1", layout="small")
    net = LoRANetwork.create(model.lora_targets(conv=True), NetworkSpec(network_dim=4, network_alpha=2, conv_dim=2))
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.normal_(0, 0.1)
    return net, model


def _data_section(path) -> bytes:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw[8 + n:]


def test_kohya_layout_metadata_and_hashes(tmp_path, net_and_model):
    net, model = net_and_model
    path = tmp_path / "x.safetensors"
    md = save_lora(net.kohya_state_dict(), path, metadata=model.lora_metadata(), dtype=torch.float16)
    sd = load_file(str(path))
    assert set(sd) == set(net.state_dict())
    assert all(v.dtype == torch.float16 for v in sd.values())  # alpha too, as kohya
    assert sd[f"{net.names[0]}.alpha"].dim() == 0
    for key in ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_v2",
                "modelspec.architecture", "modelspec.sai_model_spec", "sshs_model_hash", "sshs_legacy_hash"):
        assert key in md
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sd_v1"
    assert md["ss_network_dim"] == "Dynamic"  # rank 4 for attention, 2 for 3x3 convs
    # The data section does not depend on metadata, so the model hash is its sha256.
    assert md["sshs_model_hash"] == hashlib.sha256(_data_section(path)).hexdigest()
    assert sshs_hashes(sd, md) == (md["sshs_model_hash"], md["sshs_legacy_hash"])


def test_peft_format_is_read_as_kohya(tmp_path, net_and_model):
    net, model = net_and_model
    kohya = net.kohya_state_dict()
    targets = {t.name: t for t in model.lora_targets(conv=True)}
    paths = {}
    for name, mod in model.unet.named_modules():
        paths[f"lora_unet_{name.replace('.', '_')}"] = f"unet.{name}"
    for name, mod in model.text_encoder.named_modules():
        paths[f"lora_te_text_model_{name.replace('.', '_')}"] = f"text_encoder.{name}"
    peft = {}
    for n in net.names:
        assert n in targets
        rank = kohya[f"{n}.lora_down.weight"].shape[0]
        scale = float(kohya[f"{n}.alpha"]) / rank
        peft[f"{paths[n]}.lora_A.weight"] = kohya[f"{n}.lora_down.weight"] * scale  # bake alpha/rank in
        peft[f"{paths[n]}.lora_B.weight"] = kohya[f"{n}.lora_up.weight"]
    save_file(peft, str(tmp_path / "peft.safetensors"))
    lf = load_lora(tmp_path / "peft.safetensors")
    assert lf.source_format == "peft"
    assert set(lf.module_names()) == set(net.names)
    for n in net.names:  # same delta, alpha = rank since the file has none
        assert lf.scale(n) == 1.0
        d_ref = float(kohya[f"{n}.alpha"]) / kohya[f"{n}.lora_down.weight"].shape[0] * (
            kohya[f"{n}.lora_up.weight"].flatten(1) @ kohya[f"{n}.lora_down.weight"].flatten(1))
        d = lf.tensors[f"{n}.lora_up.weight"].flatten(1) @ lf.tensors[f"{n}.lora_down.weight"].flatten(1)
        torch.testing.assert_close(d, d_ref)


def test_damaged_files_are_refused_with_the_file_named(tmp_path, net_and_model):
    net, _ = net_and_model
    good = tmp_path / "good.safetensors"
    save_lora(net.kohya_state_dict(), good)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="trunc.safetensors.*(truncated|corrupt)"):
        load_lora(truncated)
    sd = net.kohya_state_dict()
    sd[f"{net.names[0]}.lora_up.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(UserError, match="NaN"):
        load_lora(tmp_path / "nan.safetensors")
    text = tmp_path / "text.safetensors"
    text.write_text("this is not a tensor file")
    with pytest.raises(UserError, match="text.safetensors"):
        load_lora(text)
    sd = net.kohya_state_dict()
    sd[f"{net.names[0]}.alpha"] = torch.tensor(0.0)
    save_file(sd, str(tmp_path / "alpha0.safetensors"))
    lf = load_lora(tmp_path / "alpha0.safetensors")  # kohya: alpha 0 means alpha = rank
    assert lf.scale(net.names[0]) == 1.0


def test_metadata_is_strings_and_json_parses(tmp_path, net_and_model):
    net, model = net_and_model
    md = save_lora(net.kohya_state_dict(), tmp_path / "m.safetensors",
                   metadata={"ss_tag_frequency": json.dumps({"d": {"a": 1}}), **model.lora_metadata()})
    assert all(isinstance(v, str) for v in md.values())
    assert json.loads(md["ss_tag_frequency"]) == {"d": {"a": 1}}
