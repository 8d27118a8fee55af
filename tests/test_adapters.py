"""LoHa, LoKr, DoRA beside LoRA/LoCon: ΔW against lycoris-lora's functional oracle, the network's
behaviour (multiplier 0, per-sample, fuse/unfuse, image == merged weights), and the files as the
A1111/ComfyUI delta formulas read them (implemented here from the formats reference, §4-§7)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn

from difflora.generate import GenerationRequest, generate
from difflora.toy.tiny import build_tiny_sd
from difflora.network.adapters import ADAPTERS, adapter_options
from difflora.network.apply import network_from_file
from difflora.network.files import load_lora, save_lora
from difflora.network.lora import LoRANetwork, NetworkSpec

LAYERS = {
    "linear": lambda: nn.Linear(24, 20),
    "conv1x1": lambda: nn.Conv2d(24, 20, 1),
    "conv3x3": lambda: nn.Conv2d(24, 20, 3, padding=1),
}
# (algo, options) as a job would ask for them
VARIANTS = {
    "lora": dict(algo="lora"),
    "locon-tucker": dict(algo="lora", use_tucker=True),
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4),
    "lokr-tucker": dict(algo="lokr", factor=4, use_tucker=True),
    "lokr-both": dict(algo="lokr", factor=8, decompose_both=True),
    "lokr-full": dict(algo="lokr", full_matrix=True),
    "dora": dict(algo="dora"),
    "doha": dict(algo="loha", dora_wd=True),
    "dokr": dict(algo="lokr", factor=4, dora_wd=True),
}


def _randomize(adapter, seed: int) -> None:
    """Random factors (fresh ones give ΔW = 0); DoRA magnitudes away from the norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name == "dora_scale":
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _module(variant: str, layer: str, rank: int = 3, alpha: float = 1.5, seed: int = 0):
    org = LAYERS[layer]()
    opts = adapter_options(**VARIANTS[variant])
    adapter = ADAPTERS[opts.algo].new("lora_unet_m", org, rank, alpha, opts)
    _randomize(adapter, seed)
    return org, adapter


# ------------------------------------------------------------------ ΔW against lycoris-lora
def _lycoris_delta(adapter) -> torch.Tensor:
    """s·ΔW by lycoris.functional (the oracle), from the module's tensors in LyCORIS' layout."""
    from lycoris.functional import lokr, locon, loha

    t = {k: v.detach().double() for k, v in adapter.tensors().items()}
    shape = tuple(adapter.org_module.weight.shape)
    s = adapter.scale
    if adapter.algo == "lora":
        down = t["lora_down.weight"]
        if down.dim() == 2:  # functional LoCon wants conv-style factors for the layer it rebuilds
            down = down.reshape(*down.shape, *([1] * (len(shape) - 2)))
        up = t["lora_up.weight"].reshape(shape[0], -1, *([1] * (len(shape) - 2)))
        return locon.diff_weight(down, up, t.get("lora_mid.weight"), gamma=s, backend="torch").reshape(shape)
    if adapter.algo == "loha":
        if "hada_t1" in t:
            args = (t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t["hada_t1"], t["hada_t2"])
        else:
            b1, b2 = (t[k].reshape(t[k].shape[0], *shape[1:]) for k in ("hada_w1_b", "hada_w2_b"))
            args = (b1, t["hada_w1_a"], b2, t["hada_w2_a"], None, None)
        return loha.diff_weight(*args, gamma=s, backend="torch").reshape(shape)
    w2b = t.get("lokr_w2_b")
    if w2b is not None and "lokr_t2" not in t and len(shape) == 4:
        w2b = w2b.reshape(w2b.shape[0], -1, *shape[2:])  # LyCORIS' functional keeps the kernel axes
    return lokr.kron_weight(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                            t.get("lokr_w2_a"), w2b, t.get("lokr_t2"), scale=s, backend="torch").reshape(shape)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("variant", ["lora", "locon-tucker", "loha", "loha-tucker", "lokr", "lokr-tucker",
                                     "lokr-both", "lokr-full"])
def test_delta_equals_lycoris_functional(variant, layer):
    """s·ΔW as LyCORIS' training forward computes it (its functional formulas with the scale given once);
    not LyCORIS' merge_to / tools/merge.py, which apply s twice for LoHa and LoKr (reference §5)."""
    org, adapter = _module(variant, layer)
    ours = adapter.weight_delta().double()
    oracle = _lycoris_delta(adapter)
    assert ours.abs().max() > 1e-3
    assert (ours - oracle).abs().max() < 1e-6 * max(1.0, float(oracle.abs().max()))
    # tucker only where LyCORIS has it: kxk convs
    tucker = any(k in adapter.shapes for k in ("lora_mid.weight", "hada_t1", "lokr_t2"))
    assert tucker == (VARIANTS[variant].get("use_tucker", False) and layer == "conv3x3" and "lokr_w2" not in adapter.shapes)


@pytest.mark.parametrize("layer", ["linear", "conv3x3"])
@pytest.mark.parametrize("on_output", [False, True], ids=["input-axis", "output-axis"])
def test_dora_at_strength_1_equals_lycoris_weight_decompose(layer, on_output):
    """difflora writes the input axis; files with LyCORIS >= 3.2's output axis are read the way LyCORIS trained them."""
    from lycoris.functional.general import weight_decompose

    org, adapter = _module("dora", layer)
    w = org.weight.detach().double()
    if on_output:
        with torch.no_grad():
            adapter.dora_scale = nn.Parameter(w.reshape(w.shape[0], -1).norm(dim=1).reshape(
                w.shape[0], *([1] * (w.dim() - 1))).float() * 1.2)
    v = w + adapter.weight_delta().double()
    oracle = weight_decompose(v, adapter.dora_scale.detach().double(), 1, wd_on_out=on_output, backend="torch")
    ours = w + adapter.effective_delta().detach().double()
    assert (ours - oracle).abs().max() < 1e-6


def test_lokr_layouts_and_alpha_follow_lycoris():
    from difflora.network.adapters.lokr import factorization

    assert [factorization(d) for d in (320, 640, 768, 1280)] == [(16, 20), (20, 32), (24, 32), (32, 40)]
    assert factorization(320, 8) == (8, 40) and factorization(1280, 16) == (16, 80)
    lin = nn.Linear(320, 320)
    m = ADAPTERS["lokr"].new("x", lin, 8, 4, adapter_options("lokr", factor=16))
    assert {k: tuple(v) for k, v in m.shapes.items()} == {"lokr_w1": (16, 16), "lokr_w2_a": (20, 8), "lokr_w2_b": (8, 20)}
    assert m.scale == 0.5
    conv = nn.Conv2d(320, 640, 3, padding=1)
    m = ADAPTERS["lokr"].new("x", conv, 4, 1, adapter_options("lokr", factor=8))
    assert {k: tuple(v) for k, v in m.shapes.items()} == {"lokr_w1": (8, 8), "lokr_w2_a": (80, 4), "lokr_w2_b": (4, 360)}
    m = ADAPTERS["lokr"].new("x", conv, 4, 1, adapter_options("lokr", factor=8, use_tucker=True))
    assert {k: tuple(v) for k, v in m.shapes.items()} == {"lokr_w1": (8, 8), "lokr_t2": (4, 4, 3, 3),
                                                         "lokr_w2_a": (4, 80), "lokr_w2_b": (4, 40)}
    # both factors full: alpha stored = rank, scale 1 whatever the job's alpha
    m = ADAPTERS["lokr"].new("x", nn.Linear(64, 48), 8, 4, adapter_options("lokr"))
    assert set(m.shapes) == {"lokr_w1", "lokr_w2"} and float(m.alpha) == 8 and m.scale == 1.0


def test_fresh_modules_have_zero_delta_and_lycoris_init():
    for variant in VARIANTS:
        for layer in LAYERS:
            org = LAYERS[layer]()
            opts = adapter_options(**VARIANTS[variant])
            m = ADAPTERS[opts.algo].new("x", org, 3, 1.0, opts)
            assert float(m.effective_delta().detach().abs().max()) < 1e-6, (variant, layer)
            if opts.dora_wd:  # magnitude initialised to the input-axis norms, written keepdim (1, I[, 1, 1])
                assert tuple(m.dora_scale.shape) == (1, 24, *([1] * (org.weight.dim() - 2)))
    h = ADAPTERS["loha"].new("x", nn.Linear(24, 20), 3, 1.0, adapter_options("loha"))
    assert torch.count_nonzero(h.hada_w2_a) == 0 and h.hada_w1_b.std() > 0.5 and h.hada_w1_a.std() < 0.3


# ------------------------------------------------------------------ the network on the tiny model
@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd("sd1", layout="small")


def _network(model, variant, seed=0):
    spec = NetworkSpec(network_dim=4, network_alpha=2, conv_dim=3, conv_alpha=1, adapter=adapter_options(**VARIANTS[variant]))
    net = LoRANetwork.create(model.lora_targets(conv=True), spec)
    for i, m in enumerate(net.loras()):
        _randomize(m, seed * 1000 + i)
        with torch.no_grad():  # small deltas: the tiny model stays in its working range
            for name, p in m.named_parameters():
                if name != "dora_scale":
                    p.mul_(0.5)
    return net


@pytest.mark.parametrize("variant", ["lora", "locon-tucker", "loha", "lokr", "dora", "doha", "dokr"])
def test_network_multiplier_zero_per_sample_and_fuse(tiny, variant):
    model = tiny
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    torch.manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    prompts = ["a face", "a face, red hair", "eyes closed"]
    base = model.predict(x, t, model.encode_prompts(prompts))
    net = _network(model, variant).apply_to()
    net.set_multiplier(0.0)
    assert torch.equal(model.predict(x, t, model.encode_prompts(prompts)), base)
    net.set_multiplier(1.0)
    assert (model.predict(x, t, model.encode_prompts(prompts)) - base).abs().max() > 1e-3
    # per-sample multipliers (ADDifT's batch_both_directions) equal separate passes, negative included
    ms = [0.5, -1.0, 2.0]
    separate = []
    for i, m in enumerate(ms):
        net.set_multiplier(m)
        separate.append(model.predict(x[i:i + 1], t[i:i + 1], model.encode_prompts(prompts[i:i + 1])))
    net.set_multiplier(torch.tensor(ms))
    batched = model.predict(x, t, model.encode_prompts(prompts))
    torch.testing.assert_close(batched, torch.cat(separate), atol=1e-5, rtol=1e-5)
    # fuse then unfuse: the hooked output at 0.8, then the weights restored bit for bit
    net.set_multiplier(0.8)
    hooked = model.predict(x, t, model.encode_prompts(prompts))
    net.remove()
    net.fuse(0.8)
    torch.testing.assert_close(model.predict(x, t, model.encode_prompts(prompts)), hooked, atol=1e-4, rtol=1e-4)
    net.unfuse()
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())


@pytest.mark.parametrize("variant", ["lora", "loha", "lokr", "dora"])
def test_generated_image_equals_delta_merged_into_weights(tiny, variant):
    model = tiny
    net = _network(model, variant, seed=3).apply_to()
    req = GenerationRequest(prompts=["a face, red hair"], seeds=[5], steps=3, sampler="euler", cfg=3.0)
    net.set_multiplier(0.0)
    base_img = generate(model, [net], req, output="float")[0]
    net.set_multiplier(1.0)
    hooked = generate(model, [net], req, output="float")[0]
    net.remove()
    saved = {lora.lora_name: lora.org_module.weight.detach().clone() for lora in net.loras()}
    with torch.no_grad():  # W + ΔW_eff, written out here: the merged model
        for lora in net.loras():
            lora.org_module.weight.add_(lora.effective_delta())
    merged = generate(model, [], req, output="float")[0]
    with torch.no_grad():
        for lora in net.loras():
            lora.org_module.weight.copy_(saved[lora.lora_name])
    assert np.abs(hooked - base_img).max() > 1e-3
    assert np.abs(hooked - merged).max() < 1e-4


# ------------------------------------------------------------------ files, as the clients read them
def _client_delta(parts: dict[str, torch.Tensor], w: torch.Tensor, m: float) -> torch.Tensor:
    """The weight change A1111 / ComfyUI apply at strength m, from the reference's formulas (§3-§7)."""
    t = {k: v.double() for k, v in parts.items()}
    shape = w.shape
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        r = down.shape[0]
        if "lora_mid.weight" in t:
            dw = torch.einsum("i j h w, o i, j c -> o c h w", t["lora_mid.weight"], up.reshape(up.shape[0], r),
                              down.reshape(r, -1))
        else:
            dw = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
    elif "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            halves = [torch.einsum("i j h w, j c, i o -> o c h w", t[f"hada_t{k}"], t[f"hada_w{k}_b"], t[f"hada_w{k}_a"])
                      for k in (1, 2)]
            dw = halves[0] * halves[1]
        else:
            dw = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j h w, i o, j c -> o c h w", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        dw = torch.kron(w1, w2.contiguous())  # A1111 makes w2 contiguous; ComfyUI does not and skips tucker LoKr
        r = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    scale = float(t["alpha"]) / r if (r is not None and "alpha" in t) else 1.0
    dw = dw.reshape(shape) * scale
    if "dora_scale" not in t:
        return m * dw
    v = w.double() + dw  # A1111: W' = W + m·(V·d/‖V‖_col − W), the norm over all axes but the input channel
    col = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1).reshape(1, v.shape[1], *([1] * (v.dim() - 2)))
    return m * (v * t["dora_scale"] / col - w.double())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_file_applies_by_the_client_formulas(tiny, tmp_path, variant):
    model = tiny
    net = _network(model, variant, seed=5)
    path = tmp_path / f"{variant}.safetensors"
    from difflora.network.metadata import network_metadata

    opts = adapter_options(**VARIANTS[variant])
    save_lora(net.kohya_state_dict(), path, {**model.lora_metadata(), **network_metadata(opts, 3, 1)})
    lora = load_lora(path)
    assert lora.metadata["ss_network_module"] == ("networks.lora" if variant == "lora" else "lycoris.kohya")
    if variant != "lora":
        import json

        args = json.loads(lora.metadata["ss_network_args"])
        assert args["algo"] == opts.algo and args["conv_dim"] == "3"
    for name in lora.module_names():
        assert lora.adapter(name).algo == opts.algo
        if "dora_scale" in lora.modules[name][1]:
            d = lora.modules[name][1]["dora_scale"]
            assert d.dim() >= 2 and d.shape[0] == 1  # input axis, never 1-D
    loaded = network_from_file(model, path, 0.5, attach=False)
    targets = {t.name: t.module for t in model.lora_targets(conv=True)}
    for mod in loaded.loras():
        w = targets[mod.lora_name].weight.detach()
        client = _client_delta(lora.modules[mod.lora_name][1], w, 0.5)
        ours = 0.5 * mod.effective_delta().double()
        trained = 0.5 * net.get_submodule(mod.lora_name).effective_delta().double()
        assert (ours - client).abs().max() < 1e-6 * max(1.0, float(client.abs().max()))
        assert (trained - client).abs().max() < 1e-6 * max(1.0, float(client.abs().max()))


# ------------------------------------------------------------------ bad files, tools
def _save(tmp_path, model, variant, name=None, seed=7):
    net = _network(model, variant, seed=seed)
    path = tmp_path / (name or f"{variant}.safetensors")
    save_lora(net.kohya_state_dict(), path, model.lora_metadata())
    return path, net


def _one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_damaged_lycoris_files_are_refused_naming_the_key(tmp_path, tiny_sd1_dir, run_cli):
    from safetensors.torch import load_file, save_file

    from difflora.models import load_model

    model = load_model(tiny_sd1_dir)
    src, _ = _save(tmp_path, model, "loha")
    t = load_file(src)
    victim = sorted(k for k in t if k.endswith(".hada_w2_b"))[0]
    del t[victim]
    save_file(t, tmp_path / "nob.safetensors")
    out = tmp_path / "out"
    code, _, err = run_cli("generate", "--model", tiny_sd1_dir, "--lora", tmp_path / "nob.safetensors", "--prompt",
                           "a face", "--steps", 1, "--out", out)
    _one_line_error(code, err, "nob.safetensors", victim)
    assert not out.exists()

    src, _ = _save(tmp_path, model, "dora")
    t = load_file(src)
    key = sorted(k for k in t if k.endswith(".dora_scale"))[0]
    t[key] = t[key].flatten()  # 1-D: the shape both UIs mis-broadcast
    save_file(t, tmp_path / "flat.safetensors")
    code, _, err = run_cli("inspect", tmp_path / "flat.safetensors")
    _one_line_error(code, err, "flat.safetensors", key, "never 1-D")
    t[key] = torch.ones(1, t[key].numel() + 1)  # an input axis of the wrong size
    save_file(t, tmp_path / "wide.safetensors")
    code, _, err = run_cli("generate", "--model", tiny_sd1_dir, "--lora", tmp_path / "wide.safetensors", "--prompt",
                           "a face", "--steps", 1, "--out", out)
    _one_line_error(code, err, "wide.safetensors", key)
    assert not out.exists()


def test_inspect_shows_algorithm_and_options(tmp_path, tiny, run_cli):
    import json

    from difflora.network.metadata import network_metadata

    net = _network(tiny, "lokr")
    opts = adapter_options(**VARIANTS["lokr"])
    save_lora(net.kohya_state_dict(), tmp_path / "k.safetensors", network_metadata(opts, 3, 1))
    code, out, err = run_cli("inspect", tmp_path / "k.safetensors")
    assert code == 0, err
    assert "algorithm:          LoKr" in out and "lycoris.kohya  algo=lokr" in out and "factor=4" in out
    code, out, _ = run_cli("inspect", "--json", tmp_path / "k.safetensors")
    info = json.loads(out)
    assert sum(info["algorithm"].values()) == len(net.names) and info["network_args"]["algo"] == "lokr"


@pytest.mark.parametrize("variant", ["loha", "lokr", "dora"])
def test_tools_take_every_adapter(tmp_path, tiny_sd1_dir, run_cli, variant):
    """merge into a model (ΔW_eff added), svd-merge/resize to LoRA (dense delta then SVD),
    LoRA + LoRA merge refused with the way to do it."""
    from difflora.models import load_model
    from difflora.network.lowrank import dense_delta

    model = load_model(tiny_sd1_dir)
    path, net = _save(tmp_path, model, variant)
    targets = {t.name: t.module for t in model.lora_targets(conv=True)}
    want = {m.lora_name: m.effective_delta().detach().reshape(m.effective_delta().shape[0], -1) for m in net.loras()}

    # into the model: W + 0.7·ΔW_eff
    code, _, err = run_cli("merge", "--model", tiny_sd1_dir, "--models", path, "--ratios", 0.7,
                           "--save-to", tmp_path / "merged")
    assert code == 0, err
    merged = {t.name: t.module.weight for t in load_model(tmp_path / "merged").lora_targets(conv=True)}
    for name, d in want.items():
        w = targets[name].weight.detach()
        torch.testing.assert_close((merged[name] - w).reshape(d.shape), 0.7 * d, atol=2e-6, rtol=1e-4)

    # to a LoRA: full rank is exact (needs the base model for DoRA and LyCORIS convs)
    code, _, err = run_cli("svd-merge", "--models", path, "--new-rank", 64, "--save-to", tmp_path / "s.safetensors")
    _one_line_error(code, err, "--model")
    assert not (tmp_path / "s.safetensors").exists()
    code, _, err = run_cli("svd-merge", "--models", path, "--new-rank", 64, "--base-model", tiny_sd1_dir,
                           "--save-to", tmp_path / "s.safetensors")
    assert code == 0, err
    out = load_lora(tmp_path / "s.safetensors")
    assert out.is_plain_lora() and out.metadata["ss_network_module"] == "networks.lora"
    for name, d in want.items():
        torch.testing.assert_close(dense_delta(out.tensors, name), d, atol=1e-5, rtol=1e-4)
    # resize to rank 2: the best rank-2 approximation of each module's ΔW_eff
    code, out_text, err = run_cli("resize", "--model", path, "--new-rank", 2, "--base-model", tiny_sd1_dir,
                                  "--save-to", tmp_path / "r.safetensors")
    assert code == 0, err
    small = load_lora(tmp_path / "r.safetensors")
    for name, d in want.items():
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(dense_delta(small.tensors, name).double(), best, atol=1e-5, rtol=1e-4)
        assert small.rank_alpha(name)[0] <= 2
    # LoRA + LoRA merge takes plain LoRA files and says how to merge the others
    code, _, err = run_cli("merge", "--models", path, path, "--save-to", tmp_path / "m.safetensors")
    _one_line_error(code, err, path.name, "svd-merge")
    assert not (tmp_path / "m.safetensors").exists()


def test_diffusers_refuses_lycoris_files_and_drops_dora(tmp_path, tiny):
    """What the README says about diffusers: it raises on LoHa, LoKr and Tucker LoCon files, and
    reads a DoRA file as its LoRA part (dora_scale filtered out with a warning)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    for variant in ("loha", "lokr", "locon-tucker"):
        sd = _network(tiny, variant).kohya_state_dict()
        with pytest.raises(ValueError):
            _convert_non_diffusers_lora_to_diffusers(dict(sd))
    dora = _network(tiny, "dora")
    save_lora(dora.kohya_state_dict(), tmp_path / "d.safetensors")
    state = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "d.safetensors"))[0]
    assert len(state) == 2 * len(dora.names)  # up and down of every module, no magnitude
    assert not any("dora" in k or "magnitude" in k for k in state)


def test_resize_dynamic_reports_retained_fraction_and_warns_when_capped(tmp_path, run_cli, caplog):
    g = torch.Generator().manual_seed(3)
    sd = {"lora_unet_a.lora_down.weight": torch.randn(4, 12, generator=g), "lora_unet_a.lora_up.weight":
          torch.randn(10, 4, generator=g), "lora_unet_a.alpha": torch.tensor(4.0)}
    save_lora(sd, tmp_path / "a.safetensors")
    s = torch.linalg.svdvals(sd["lora_unet_a.lora_up.weight"] @ sd["lora_unet_a.lora_down.weight"]).double()
    code, out, err = run_cli("resize", "--model", tmp_path / "a.safetensors", "--new-rank", 1, "--dynamic", "sv_fro",
                             "--param", 0.99, "--save-to", tmp_path / "r.safetensors")
    assert code == 0, err
    kept = float(s[0] / s.norm())  # capped at rank 1: the first direction's share of the Frobenius norm
    assert f"mean {kept:.1%}, lowest {kept:.1%}" in out
    assert "keep less than sv_fro 0.99" in caplog.text and "lora_unet_a" in caplog.text
