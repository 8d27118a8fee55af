"""The LoRA network: kohya names, maths, multipliers, fuse/unfuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from difflora.models.sd.model import text_encoder_lora_targets, unet_lora_targets
from difflora.toy.tiny import build_real_architecture, build_tiny_sd
from difflora.network.adapters import LoRA
from difflora.network.lora import LoRANetwork, NetworkSpec
from difflora.network.lowrank import lora_weight_delta

KEYS = Path(__file__).parent / "data" / "kohya_keys"  # kohya sd-scripts' module names, one per line


def _ref(name: str) -> set[str]:
    return set((KEYS / name).read_text().split())


@pytest.mark.parametrize("variant,te_file", [("sd1", "sd1_te.txt"), ("sd2", "sd2_te.txt")])
def test_key_sets_match_kohya_for_real_architectures(variant, te_file):
    unet, te = build_real_architecture(variant)  # meta device: no memory
    assert {t.name for t in unet_lora_targets(unet, conv=False)} == _ref("sd1_unet_lierla.txt")
    assert {t.name for t in unet_lora_targets(unet, conv=True)} == _ref("sd1_unet_c3lier.txt")
    assert {t.name for t in text_encoder_lora_targets(te)} == _ref(te_file)
    default = LoRANetwork.create(text_encoder_lora_targets(te) + unet_lora_targets(unet, conv=False),
                                 NetworkSpec(network_dim=4))
    conv = LoRANetwork.create(text_encoder_lora_targets(te) + unet_lora_targets(unet, conv=True),
                              NetworkSpec(network_dim=4, conv_dim=4))
    assert len(default.names) == 192 + (72 if variant == "sd1" else 138)
    assert len(conv.names) == 278 + (72 if variant == "sd1" else 138)
    expected_keys = {f"{n}.{p}" for n in conv.names for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(conv.state_dict()) == expected_keys


def test_tiny_sd15_layout_has_the_real_module_names():
    m = build_tiny_sd("sd1", layout="sd15")
    assert {t.name for t in m.lora_targets(conv=True) if t.component == "unet"} == _ref("sd1_unet_c3lier.txt")


def test_init_scale_and_shapes():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    lora = LoRA.new("x", conv, rank=4, alpha=2)
    assert lora.lora_down.weight.shape == (4, 8, 3, 3)
    assert lora.lora_up.weight.shape == (16, 4, 1, 1)
    assert torch.count_nonzero(lora.lora_up.weight) == 0 and lora.lora_down.weight.abs().sum() > 0
    assert lora.scale == 0.5
    assert LoRA.new("y", nn.Linear(3, 5), rank=4, alpha=None).scale == 1.0  # no alpha: alpha = rank
    assert LoRA.new("z", nn.Linear(3, 5), rank=4, alpha=0).scale == 1.0


@pytest.mark.parametrize("module", [nn.Linear(6, 5), nn.Conv2d(6, 5, 1), nn.Conv2d(6, 5, 3, padding=1),
                                    nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.Conv2d(6, 5, 1, stride=2)])
def test_hook_equals_dense_formula(module):
    torch.manual_seed(0)
    net = LoRANetwork.create([_target(module)], NetworkSpec(network_dim=3, network_alpha=1.5, conv_dim=2, conv_alpha=4))
    lora = net.loras()[0]
    nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(2, 6) if isinstance(module, nn.Linear) else torch.randn(2, 6, 7, 7)
    net.apply_to()
    net.set_multiplier(0.7)
    y = module(x)
    net.remove()
    dense = module.weight + 0.7 * lora_weight_delta(lora.lora_up.weight, lora.lora_down.weight, lora.scale,
                                                    tuple(module.weight.shape))
    ref = nn.functional.linear(x, dense, module.bias) if isinstance(module, nn.Linear) else nn.functional.conv2d(
        x, dense, module.bias, module.stride, module.padding)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def _target(module):
    from difflora.network.lora import LoRATarget

    return LoRATarget("lora_unet_m", module, "unet")


def _randomized_network(model, conv=True, seed=0):
    net = LoRANetwork.create(model.lora_targets(conv=conv), NetworkSpec(network_dim=4, network_alpha=2, conv_dim=2,
                                                                       conv_alpha=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.2)
    return net


def test_multipliers_zero_negative_and_per_sample():
    model = build_tiny_sd("sd1", layout="small")
    torch.manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    cond = model.encode_prompts(["a face", "a face, red hair", "eyes closed"])
    base = model.predict(x, t, cond)
    net = _randomized_network(model).apply_to()
    # multiplier 0 reproduces the base model exactly
    net.set_multiplier(0.0)
    assert torch.equal(model.predict(x, t, model.encode_prompts(["a face", "a face, red hair", "eyes closed"])), base)
    net.set_multiplier(1.0)
    plus = model.predict(x, t, model.encode_prompts(["a face", "a face, red hair", "eyes closed"]))
    assert (plus - base).abs().max() > 1e-3
    # -1 equals applying the negated delta
    net.set_multiplier(-1.0)
    minus = model.predict(x, t, model.encode_prompts(["a face", "a face, red hair", "eyes closed"]))
    neg = _randomized_network(model)
    neg.load_state_dict(net.state_dict())
    with torch.no_grad():
        for lora in neg.loras():
            lora.lora_up.weight.neg_()
    net.remove()
    neg.apply_to()
    torch.testing.assert_close(minus, model.predict(x, t, model.encode_prompts(
        ["a face", "a face, red hair", "eyes closed"])), atol=1e-6, rtol=1e-5)
    neg.remove()
    # per-sample multipliers in one batch equal separate passes
    net.apply_to()
    ms = [0.5, -1.0, 2.0]
    separate = []
    for i, m in enumerate(ms):
        net.set_multiplier(m)
        separate.append(model.predict(x[i:i + 1], t[i:i + 1], model.encode_prompts([["a face", "a face, red hair",
                                                                                      "eyes closed"][i]])))
    net.set_multiplier(torch.tensor(ms))
    batched = model.predict(x, t, model.encode_prompts(["a face", "a face, red hair", "eyes closed"]))
    torch.testing.assert_close(batched, torch.cat(separate), atol=1e-5, rtol=1e-5)
    net.remove()


def test_fuse_then_unfuse_restores_base_weights_exactly():
    model = build_tiny_sd("sd1", layout="small")
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    net = _randomized_network(model)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    net.apply_to()
    net.set_multiplier(0.8)
    hooked = model.predict(x, t, model.encode_prompts(["a face"]))
    net.remove()
    net.fuse(0.8)
    fused = model.predict(x, t, model.encode_prompts(["a face"]))
    assert any(not torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())
    torch.testing.assert_close(fused, hooked, atol=1e-4, rtol=1e-4)
    net.unfuse()
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())


def test_dropouts_only_act_in_training():
    lin = nn.Linear(8, 8)
    lora = LoRA.new("d", lin, rank=4, alpha=4, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(16, 8)
    lora.eval()
    a, b = lora.delta(x), lora.delta(x)
    assert torch.equal(a, b)
    lora.train()
    torch.manual_seed(0)
    c = lora.delta(x)
    assert not torch.equal(a, c)
