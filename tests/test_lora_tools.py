"""LoRA tools: merge (into a model, exact and kohya LoRA merges), svd-merge, extract, resize, bad input.

All in float32 with fixed tensors on the tiny SD1 model; every expected value is computed here
from the formulas, independently of difflora.tools.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflora.models import load_model
from difflora.network.files import load_lora, save_lora

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 16x16
LIN32 = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32x32
FF = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"  # Linear 128x16
C1 = "lora_unet_down_blocks_0_attentions_0_proj_in"  # Conv 1x1 16->16
C1B = "lora_unet_down_blocks_1_resnets_0_conv_shortcut"  # Conv 1x1 16->32
C3 = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv 3x3 16->16
C3B = "lora_unet_up_blocks_0_resnets_0_conv1"  # Conv 3x3 64->32
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # Linear 16x16
TE_FC = "lora_te_text_model_encoder_layers_1_mlp_fc1"  # Linear 32x16


# ---------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def base(tiny_sd1_dir):
    """The tiny SD1 model (read-only here) and its targets by name."""
    model = load_model(tiny_sd1_dir)
    return model, {t.name: t.module for t in model.lora_targets(conv=True)}


def make_lora(targets, spec: dict[str, tuple[int, float]], seed: int) -> dict[str, torch.Tensor]:
    """Fixed random factors: spec = {module: (rank, alpha)}; kohya layout (4-D for convs)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (rank, alpha) in spec.items():
        w = targets[name].weight
        if w.dim() == 4:
            down = torch.randn(rank, w.shape[1], w.shape[2], w.shape[3], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.3
        else:
            down = torch.randn(rank, w.shape[1], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, generator=g) * 0.3
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def delta(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """(alpha/rank) · up @ down as a 2-D float64 matrix, straight from the kohya formula."""
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    r = down.shape[0]
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else r
    return alpha / r * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))


def names_of(sd) -> set[str]:
    return {k.split(".", 1)[0] for k in sd if k.endswith("lora_down.weight")}


def write(tmp_path: Path, fname: str, sd, model=None) -> Path:
    p = tmp_path / fname
    save_lora(sd, p, model.lora_metadata() if model is not None else {})
    return p


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("difflora: error: ")
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


def assert_nothing_written(folder: Path, allowed: set[str]):
    assert {p.name for p in folder.iterdir()} == allowed, sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------- merge into a model
def _check_merged_model(merged, model, targets, loras, ratios):
    mt = {t.name: t.module for t in merged.lora_targets(conv=True)}
    touched = set()
    for name in set().union(*(names_of(sd) for sd in loras)):
        w0 = targets[name].weight.detach().double()
        expected = w0.reshape(w0.shape[0], -1).clone()
        for sd, r in zip(loras, ratios):
            if f"{name}.lora_down.weight" in sd:
                expected += r * delta(sd, name)
        torch.testing.assert_close(mt[name].weight.detach().double().reshape(expected.shape), expected,
                                   rtol=1e-6, atol=2e-6)
        touched.add(name)
    # something the LoRAs do not touch is unchanged
    other = next(n for n in targets if n not in touched)
    torch.testing.assert_close(mt[other].weight, targets[other].weight, rtol=0, atol=0)
    torch.testing.assert_close(merged.vae.encoder.conv_in.weight, model.vae.encoder.conv_in.weight, rtol=0, atol=0)


def test_merge_into_diffusers_folder_and_single_file(tmp_path, base, tiny_sd1_dir, run_cli):
    model, targets = base
    a = make_lora(targets, {LIN: (4, 2.0), C1: (3, 3.0), C3: (2, 1.0), TE: (4, 8.0)}, seed=1)
    b = make_lora(targets, {LIN: (2, 1.0), C3: (4, 4.0), C1B: (2, 2.0), TE_FC: (3, 1.5)}, seed=2)
    pa, pb = write(tmp_path, "a.safetensors", a, model), write(tmp_path, "b.safetensors", b, model)
    ratios = [0.8, -0.5]

    code, out, err = run_cli("merge", "--model", tiny_sd1_dir, "--models", pa, pb, "--ratios", *ratios,
                             "--save-to", tmp_path / "merged")
    assert code == 0, err
    assert (tmp_path / "merged" / "model_index.json").exists()  # folder in -> folder out
    _check_merged_model(load_model(tmp_path / "merged"), model, targets, [a, b], ratios)

    single = tmp_path / "base.safetensors"
    model.save(single)
    base1 = load_model(single)
    t1 = {t.name: t.module for t in base1.lora_targets(conv=True)}
    code, out, err = run_cli("merge", "--model", single, "--models", pa, pb, "--ratios", *ratios,
                             "--save-to", tmp_path / "merged1.safetensors")
    assert code == 0, err
    assert (tmp_path / "merged1.safetensors").is_file()  # single file in -> single file out
    _check_merged_model(load_model(tmp_path / "merged1.safetensors"), base1, t1, [a, b], ratios)


# ---------------------------------------------------------------------------- LoRA + LoRA, exact
def _peft(model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA in peft layout (alpha/rank baked into lora_A, as there is no alpha)."""
    paths = {f"lora_unet_{n.replace('.', '_')}": f"unet.{n}" for n, _ in model.unet.named_modules()}
    paths.update({f"lora_te_text_model_{n.replace('.', '_')}": f"text_encoder.{n}"
                  for n, _ in model.text_encoder.named_modules()})
    out = {}
    for name in names_of(sd):
        r = sd[f"{name}.lora_down.weight"].shape[0]
        out[f"{paths[name]}.lora_A.weight"] = sd[f"{name}.lora_down.weight"] * (float(sd[f"{name}.alpha"]) / r)
        out[f"{paths[name]}.lora_B.weight"] = sd[f"{name}.lora_up.weight"]
    return out


def test_exact_merge_equals_the_dense_sum(tmp_path, base, run_cli):
    model, targets = base
    a = make_lora(targets, {LIN: (4, 1.0), C1: (2, 8.0), C3: (3, 2.0), TE: (4, 4.0)}, seed=3)
    b = make_lora(targets, {LIN: (2, 5.0), C1: (6, 1.0), C3: (1, 1.0), FF: (3, 3.0)}, seed=4)
    pa = write(tmp_path, "a.safetensors", a, model)
    pb = tmp_path / "b_peft.safetensors"
    save_file(_peft(model, b), str(pb))
    ratios = [1.0, -0.7]
    code, out, err = run_cli("merge", "--models", pa, pb, "--ratios", *ratios, "--save-to", tmp_path / "ab.safetensors")
    assert code == 0, err
    merged = load_lora(tmp_path / "ab.safetensors")
    assert set(merged.module_names()) == names_of(a) | names_of(b)
    for name in merged.module_names():
        expected = sum(r * delta(sd, name) for sd, r in zip([a, b], ratios) if f"{name}.lora_down.weight" in sd)
        torch.testing.assert_close(delta(merged.tensors, name), expected, rtol=1e-5, atol=1e-5)
    assert merged.rank_alpha(LIN) == (6, 6.0)  # ranks concatenated, alpha = rank
    assert merged.tensors[f"{C3}.lora_down.weight"].shape == (4, 16, 3, 3)
    assert merged.tensors[f"{C1}.lora_up.weight"].shape == (16, 8, 1, 1)
    md = merged.metadata
    assert md["ss_network_dim"] == "Dynamic" and md["ss_network_alpha"] == "Dynamic"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_network_module"] == "networks.lora"
    assert md["modelspec.merged_from"] == "a, b_peft"
    assert "sshs_model_hash" in md


# ---------------------------------------------------------------------------- LoRA + LoRA, kohya
def test_kohya_mode_ratio_acts_squared_with_cross_terms(tmp_path, base, run_cli):
    from difflora.network.files import LoraFile
    from difflora.tools.merge import merge_loras_kohya

    model, targets = base
    a = make_lora(targets, {LIN: (4, 4.0), C3: (2, 2.0)}, seed=5)
    b = make_lora(targets, {LIN: (4, 1.0), C3: (2, 8.0)}, seed=6)
    pa, pb = write(tmp_path, "a.safetensors", a, model), write(tmp_path, "b.safetensors", b, model)

    # one model, ratio 0.5 -> 0.25 · ΔW
    code, _, err = run_cli("merge", "--mode", "kohya", "--models", pa, "--ratios", 0.5, "--save-to", tmp_path / "h.safetensors")
    assert code == 0, err
    half = load_lora(tmp_path / "h.safetensors")
    for name in (LIN, C3):
        torch.testing.assert_close(delta(half.tensors, name), 0.25 * delta(a, name), rtol=1e-5, atol=1e-6)

    # two models, same ranks: (Σ|s_i| up_i)(Σ s_j down_j) · base_alpha/rank, s_i = sqrt(alpha_i/base_alpha)·ratio_i
    ratios = [0.7, -0.4]
    code, _, err = run_cli("merge", "--mode", "kohya", "--models", pa, pb, "--ratios", *ratios,
                           "--save-to", tmp_path / "k.safetensors")
    assert code == 0, err
    k = load_lora(tmp_path / "k.safetensors")
    for name in (LIN, C3):
        r = a[f"{name}.lora_down.weight"].shape[0]
        base_alpha = float(a[f"{name}.alpha"])
        s = [ratios[0], math.sqrt(float(b[f"{name}.alpha"]) / base_alpha) * ratios[1]]
        up = sum(abs(si) * sd[f"{name}.lora_up.weight"].double().reshape(-1, r) for si, sd in zip(s, [a, b]))
        down = sum(si * sd[f"{name}.lora_down.weight"].double().reshape(r, -1) for si, sd in zip(s, [a, b]))
        expected = base_alpha / r * up @ down
        torch.testing.assert_close(delta(k.tensors, name), expected, rtol=1e-5, atol=1e-5)
        assert float(k.tensors[f"{name}.alpha"]) == base_alpha
        # the cross terms are real: this is not Σ ratio_i·ΔW_i
        linear = ratios[0] * delta(a, name) + ratios[1] * delta(b, name)
        assert (delta(k.tensors, name) - linear).abs().max() > 0.1 * linear.abs().max()

    # --concat: coefficient ratio·|ratio|·r_i/Σr for any ranks and alphas (spec: 0.245 / 0.08 for 8+8)
    for (ra, rb), rat in (((8, 8), [0.7, 0.4]), ((6, 2), [0.9, -0.6])):
        la = make_lora(targets, {LIN: (ra, 3.0), C1: (ra, 1.0)}, seed=7)
        lb = make_lora(targets, {LIN: (rb, 2.0), C1: (rb, 5.0)}, seed=8)
        lfs = [LoraFile(la, {}, "a.safetensors"), LoraFile(lb, {}, "b.safetensors")]
        cat = merge_loras_kohya(lfs, rat, concat=True)
        for name in (LIN, C1):
            coeffs = [x * abs(x) * rr / (ra + rb) for x, rr in zip(rat, (ra, rb))]
            expected = coeffs[0] * delta(la, name) + coeffs[1] * delta(lb, name)
            torch.testing.assert_close(delta(cat, name), expected, rtol=1e-5, atol=1e-6)
            assert cat[f"{name}.lora_down.weight"].shape[0] == ra + rb
            assert float(cat[f"{name}.alpha"]) == float(la[f"{name}.alpha"])
    coeffs_spec = [0.7 * 0.7 * 8 / 16, 0.4 * 0.4 * 8 / 16]
    assert [round(c, 3) for c in coeffs_spec] == [0.245, 0.08]

    # --shuffle: a deterministic permutation of the rank axis; the delta does not change
    for seed, tag in ((1, "s1"), (1, "s1b"), (2, "s2")):
        code, _, err = run_cli("merge", "--mode", "kohya", "--shuffle", "--seed", seed, "--models", pa, pb,
                               "--ratios", *ratios, "--save-to", tmp_path / f"{tag}.safetensors")
        assert code == 0, err
    s1, s2 = load_file(str(tmp_path / "s1.safetensors")), load_file(str(tmp_path / "s2.safetensors"))
    assert all(torch.equal(v, load_file(str(tmp_path / "s1b.safetensors"))[k]) for k, v in s1.items())
    assert not torch.equal(s1[f"{LIN}.lora_down.weight"], k.tensors[f"{LIN}.lora_down.weight"])
    assert not torch.equal(s1[f"{LIN}.lora_down.weight"], s2[f"{LIN}.lora_down.weight"])
    for name in (LIN, C3):
        torch.testing.assert_close(delta(s1, name), delta(k.tensors, name), rtol=1e-5, atol=1e-6)


def test_kohya_mode_refuses_different_ranks(tmp_path, base, run_cli):
    model, targets = base
    pa = write(tmp_path, "a.safetensors", make_lora(targets, {LIN: (4, 4.0)}, seed=9), model)
    pb = write(tmp_path, "b.safetensors", make_lora(targets, {LIN: (2, 2.0)}, seed=10), model)
    code, _, err = run_cli("merge", "--mode", "kohya", "--models", pa, pb, "--ratios", 1, 1,
                           "--save-to", tmp_path / "out.safetensors")
    assert_one_line_error(code, err, "b.safetensors", "shape mismatch", LIN)
    assert_nothing_written(tmp_path, {"a.safetensors", "b.safetensors"})


# ---------------------------------------------------------------------------- svd-merge
def test_svd_merge_full_rank_exact_and_rank_k_is_best_approximation(tmp_path, base, run_cli):
    model, targets = base
    a = make_lora(targets, {LIN32: (4, 2.0), C3B: (3, 3.0), TE_FC: (4, 4.0), C1B: (3, 1.0)}, seed=11)
    b = make_lora(targets, {LIN32: (3, 6.0), C3B: (4, 1.0), TE_FC: (2, 1.0)}, seed=12)
    pa, pb = write(tmp_path, "a.safetensors", a, model), write(tmp_path, "b.safetensors", b, model)
    ratios = [0.9, -1.3]

    def dense_sum(name):
        return sum(r * delta(sd, name) for sd, r in zip([a, b], ratios) if f"{name}.lora_down.weight" in sd)

    code, _, err = run_cli("svd-merge", "--models", pa, pb, "--ratios", *ratios, "--new-rank", 7,
                           "--save-to", tmp_path / "full.safetensors")
    assert code == 0, err
    full = load_lora(tmp_path / "full.safetensors")
    for name in full.module_names():
        torch.testing.assert_close(delta(full.tensors, name), dense_sum(name), rtol=1e-4, atol=1e-4)
        rank, alpha = full.rank_alpha(name)
        assert alpha == rank

    k, kc = 3, 2
    code, _, err = run_cli("svd-merge", "--models", pa, pb, "--ratios", *ratios, "--new-rank", k, "--new-conv-rank", kc,
                           "--save-to", tmp_path / "k.safetensors")
    assert code == 0, err
    low = load_lora(tmp_path / "k.safetensors")
    for name in low.module_names():
        want_k = kc if name == C3B else k
        m = dense_sum(name)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        best = (u[:, :want_k] * s[:want_k]) @ vh[:want_k]
        assert low.rank_alpha(name) == (want_k, float(want_k))
        torch.testing.assert_close(delta(low.tensors, name), best, rtol=1e-4, atol=1e-5)
    assert low.tensors[f"{C3B}.lora_down.weight"].shape == (kc, 64, 3, 3)
    assert low.tensors[f"{C3B}.lora_up.weight"].shape == (32, kc, 1, 1)
    assert low.metadata["ss_network_dim"] == "Dynamic"
    assert json.loads(low.metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}



def _kohya_case():
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.5

    a = {"lora_unet_lin.lora_down.weight": r(2, 8), "lora_unet_lin.lora_up.weight": r(6, 2),
         "lora_unet_lin.alpha": torch.tensor(1.0), "lora_unet_conv.lora_down.weight": r(2, 5, 3, 3),
         "lora_unet_conv.lora_up.weight": r(4, 2, 1, 1), "lora_unet_conv.alpha": torch.tensor(2.0)}
    b = {"lora_unet_lin.lora_down.weight": r(3, 8), "lora_unet_lin.lora_up.weight": r(6, 3),
         "lora_unet_lin.alpha": torch.tensor(3.0), "lora_unet_conv.lora_down.weight": r(1, 5, 3, 3),
         "lora_unet_conv.lora_up.weight": r(4, 1, 1, 1), "lora_unet_conv.alpha": torch.tensor(0.5)}
    return a, b


def test_svd_merge_clamp_reproduces_kohya_svd_merge_lora(tmp_path, run_cli, caplog):
    """--clamp-quantile is kohya svd_merge_lora.py's algorithm: dense sum, full float32 SVD, rank padded
    to min(new_rank, in, out), signed-quantile clamp. The numbers below are kohya's (its
    merge_lora_models run on these inputs, ratios 0.7/-1.2, new_rank 6, new_conv_rank 4), compared up to
    what the SVD leaves free: each direction's sign (u_i, v_i) -> (-u_i, -v_i), fixed here by the sign
    of up[0, i] on both sides; the order is fixed (distinct singular values); the padded directions'
    basis is arbitrary (kohya's own conv down max, 0.907, lies in it), so they are only checked to
    carry no weight."""
    a, b = _kohya_case()
    save_lora(a, tmp_path / "a.safetensors")
    save_lora(b, tmp_path / "b.safetensors")
    code, _, err = run_cli("svd-merge", "--models", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                           "--ratios", 0.7, -1.2, "--new-rank", 6, "--new-conv-rank", 4, "--clamp-quantile", 0.99,
                           "--save-to", tmp_path / "k.safetensors")
    assert code == 0, err
    out = load_lora(tmp_path / "k.safetensors")
    t = out.tensors
    # kohya pads to the asked rank (the inputs' total rank is 5 and 3); a warning says so
    assert t["lora_unet_lin.lora_down.weight"].shape == (6, 8) and float(t["lora_unet_lin.alpha"]) == 6
    assert t["lora_unet_conv.lora_down.weight"].shape == (4, 5, 3, 3) and float(t["lora_unet_conv.alpha"]) == 4
    assert "above the inputs' total rank in 2 module(s)" in caplog.text
    assert "real rank 3-5" in out.metadata["ss_training_comment"]
    expected = {  # (first row, first column) of up and down (2-D views) and the clamp value, max |up|
        "lin": ([1.454491, -0.865099, -0.15744, 0.216274], [1.454491, -0.659935, 1.665213, 1.700501],
                [0.125308, 0.018659, 0.427524, -0.063383], [0.125308, 0.186712, 0.171219, -0.212705], 1.700501),
        "conv": ([0.953382, -0.111835, 0.266201], [0.953382, -0.890667, -0.964999, 0.964999],
                 [0.248322, -0.252722, -0.108875, -0.021773], [0.248322, 0.034157, -0.057547], 0.964999),
    }
    for module, real_rank in (("lin", 5), ("conv", 3)):
        up_row, up_col, down_row, down_col, clamp = (torch.tensor(v) for v in expected[module])
        up = t[f"lora_unet_{module}.lora_up.weight"].flatten(1)
        down = t[f"lora_unet_{module}.lora_down.weight"].flatten(1)
        # Tolerance from the arithmetic: two float32 SVDs (other LAPACK builds, other CPUs) agree on a singular
        # vector to about eps * |delta W| / (gap to the nearest other singular value); 16x that, in units of
        # the factor's largest entry.
        def delta(lora):
            up_, down_ = lora[f"lora_unet_{module}.lora_up.weight"], lora[f"lora_unet_{module}.lora_down.weight"]
            return up_.flatten(1) @ down_.flatten(1) * float(lora[f"lora_unet_{module}.alpha"]) / down_.shape[0]

        dense = 0.7 * delta(a) - 1.2 * delta(b)
        sv = torch.linalg.svdvals(dense.double())[:real_rank]
        gap = float(torch.cat([sv[:-1] - sv[1:], sv[-1:]]).min())
        tol = 16 * torch.finfo(torch.float32).eps * float(sv[0]) / gap * float(clamp)
        assert tol < 1e-3, tol  # well separated directions: a wrong algorithm is off by far more
        ours, theirs = torch.sign(up[0, :len(up_row)]), torch.sign(up_row)
        torch.testing.assert_close(up[0, :len(up_row)] * ours, up_row * theirs, atol=tol, rtol=0)
        torch.testing.assert_close(up[:len(up_col), 0] * ours[0], up_col * theirs[0], atol=tol, rtol=0)
        torch.testing.assert_close(down[0, :len(down_row)] * ours[0], down_row * theirs[0], atol=tol, rtol=0)
        torch.testing.assert_close(down[:len(down_col), 0] * ours[:len(down_col)], down_col * theirs[:len(down_col)],
                                   atol=tol, rtol=0)
        assert abs(float(up.abs().max()) - float(clamp)) < tol  # the clamp: kohya's quantile of |U S| and |Vh|
        assert float(up[:, real_rank:].abs().max()) < 1e-5  # the padded directions carry no weight

    # without --clamp-quantile: exact, at the real rank, and it says so
    code, _, err = run_cli("svd-merge", "--models", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                           "--ratios", 0.7, -1.2, "--new-rank", 6, "--new-conv-rank", 4,
                           "--save-to", tmp_path / "e.safetensors")
    assert code == 0, err
    exact = load_lora(tmp_path / "e.safetensors")
    assert exact.rank_alpha("lora_unet_lin") == (5, 5.0) and exact.rank_alpha("lora_unet_conv") == (3, 3.0)


# ---------------------------------------------------------------------------- extract
def _low_rank(shape, rank, seed):
    g = torch.Generator().manual_seed(seed)
    out, inp = shape[0], math.prod(shape[1:])
    return ((torch.randn(out, rank, generator=g) * 0.2) @ (torch.randn(rank, inp, generator=g) * 0.2)).reshape(shape)


def test_extract_recovers_a_known_delta_and_drops_an_unchanged_text_encoder(tmp_path, base, tiny_sd1_dir, run_cli, caplog):
    from difflora.tools.extract import extract_lora

    model, targets = base
    known = {LIN: 2, C1B: 1, C3: 3}
    tuned = load_model(tiny_sd1_dir)
    tt = {t.name: t.module for t in tuned.lora_targets(conv=True)}
    deltas = {}
    with torch.no_grad():
        for i, (name, r) in enumerate(known.items()):
            deltas[name] = _low_rank(tt[name].weight.shape, r, seed=20 + i)
            tt[name].weight.add_(deltas[name])
    tuned.save(tmp_path / "tuned")

    caplog.set_level("WARNING")
    code, out, err = run_cli("extract", "--model-org", tiny_sd1_dir, "--model-tuned", tmp_path / "tuned",
                             "--dim", 4, "--conv-dim", 3, "--save-to", tmp_path / "x.safetensors")
    assert code == 0, err
    assert "text encoder is the same" in caplog.text
    x = load_lora(tmp_path / "x.safetensors")
    assert not any(n.startswith("lora_te") for n in x.module_names())
    unet_targets = [t.name for t in model.lora_targets(conv=True) if t.component == "unet"]
    assert set(x.module_names()) == set(unet_targets)  # all U-Net modules, 3x3 convs included
    for name in x.module_names():
        d = delta(x.tensors, name)
        want = deltas[name].double().reshape(d.shape) if name in known else torch.zeros_like(d)
        torch.testing.assert_close(d, want, rtol=1e-4, atol=2e-5)
        w = targets[name].weight
        kxk = w.dim() == 4 and tuple(w.shape[2:]) != (1, 1)
        assert x.rank_alpha(name) == ((3, 3.0) if kxk else (4, 4.0))
    assert x.metadata["ss_base_model_version"] == "sd_v1"
    assert json.loads(x.metadata["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "3"}

    # a changed text encoder is kept (and recovered); no conv_dim -> no 3x3 modules
    with torch.no_grad():
        te_delta = _low_rank(tt[TE].weight.shape, 1, seed=30)
        tt[TE].weight.add_(te_delta)
    res = extract_lora(model, tuned, dim=4, conv_dim=None)
    assert not res.text_encoder_dropped and res.text_encoder_max_diff > 0.01
    got = names_of(res.tensors)
    assert TE in got and C1 in got and C3 not in got and C1B not in got  # no ResNet modules without conv_dim
    torch.testing.assert_close(delta(res.tensors, TE), te_delta.double(), rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------------- resize
def _spectral_lora(out, inp, spectrum, alpha, seed):
    """up = U·diag(S), down = Vᵀ with orthonormal U, V: the singular values of up@down are S."""
    g = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    u, _ = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, r, generator=g, dtype=torch.float64))
    s = torch.tensor(spectrum, dtype=torch.float64)
    return (u * s).float(), v.T.contiguous().float(), torch.tensor(float(alpha))


def test_resize_keeps_strength_and_dynamic_rules_pick_their_rank(tmp_path, run_cli):
    spectrum = [10.0, 8.0, 5.0, 3.0, 1.0, 0.5, 0.2, 0.1]
    sd = {}
    for name, spec, alpha, seed in ((LIN32, spectrum, 4.0, 1), (FF, [1.0] * 8, 2.0, 2),
                                    (C1B, [4.0, 2.0, 1.0, 0.0, 0.0, 0.0], 3.0, 3)):
        out, inp = {LIN32: (32, 32), FF: (128, 16), C1B: (32, 16)}[name]
        up, down, a = _spectral_lora(out, inp, spec, alpha, seed)
        if name == C1B:
            up, down = up[:, :, None, None], down[:, :, None, None]
        sd.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": a})
    src = tmp_path / "in.safetensors"
    save_lora(sd, src, {"ss_base_model_version": "sd_v1", "ss_training_comment": "orig"})

    # fixed rank 3: C1B has true rank 3, so its delta is kept exactly (norm and all), alpha = scale·3
    code, out, err = run_cli("resize", "--model", src, "--save-to", tmp_path / "r3.safetensors", "--new-rank", 3)
    assert code == 0, err
    r3 = load_lora(tmp_path / "r3.safetensors")
    d_in, d_out = delta(sd, C1B), delta(r3.tensors, C1B)
    assert abs(float(torch.linalg.norm(d_out) / torch.linalg.norm(d_in)) - 1.0) < 1e-5
    torch.testing.assert_close(d_out, d_in, rtol=1e-5, atol=1e-5)
    assert r3.rank_alpha(C1B) == (3, pytest.approx(3.0 / 6 * 3))
    assert r3.tensors[f"{C1B}.lora_up.weight"].shape == (32, 3, 1, 1)
    # a truncated module keeps exactly its top-3 part: norm retained = sqrt(Σ_{≤3} S²/Σ S²)
    ratio = float(torch.linalg.norm(delta(r3.tensors, LIN32)) / torch.linalg.norm(delta(sd, LIN32)))
    assert ratio == pytest.approx(math.sqrt(sum(s * s for s in spectrum[:3]) / sum(s * s for s in spectrum)), rel=1e-5)
    assert r3.rank_alpha(LIN32) == (3, pytest.approx(4.0 / 8 * 3))
    assert r3.metadata["ss_training_comment"] == "dimension is resized from Dynamic to 3; orig"
    assert r3.metadata["ss_base_model_version"] == "sd_v1"

    # dynamic rules on S = 10, 8, 5, 3, 1, .5, .2, .1 (zero-padded to 32), worked out by hand:
    #   sv_ratio 4:        S > 2.5 -> 4 values;                         kohya 4+1 = 5, minimal 4
    #   sv_cumulative .9:  cumsum/27.8 = .360 .647 .827 .935 -> idx 3;   kohya 3+1+1 = 5, minimal 4
    #   sv_fro .95:        cumsum(S²)/199.3 = .502 .823 .948 vs .9025 -> idx 2; kohya 2+1+1 = 4, minimal 3
    # FF's flat spectrum (8 equal values) keeps all 8 under every rule (kohya's 9 is capped at the rank, 8).
    cases = {("sv_ratio", 4.0): (5, 4), ("sv_cumulative", 0.9): (5, 4), ("sv_fro", 0.95): (4, 3)}
    for (method, param), (want_kohya, want_min) in cases.items():
        for rule, want in (("kohya", want_kohya), ("minimal", want_min)):
            out_path = tmp_path / f"{method}-{rule}.safetensors"
            code, out, err = run_cli("resize", "--model", src, "--save-to", out_path, "--new-rank", 8,
                                     "--dynamic", method, "--param", param, "--dynamic-rule", rule, "--verbose")
            assert code == 0, err
            r = load_lora(out_path)
            assert r.rank_alpha(LIN32)[0] == want, (method, rule)
            assert r.rank_alpha(LIN32)[1] == pytest.approx(0.5 * want)  # strength kept: alpha/rank = 0.5
            assert r.rank_alpha(FF)[0] == 8
            assert r.metadata["ss_network_dim"] == "Dynamic"
            assert r.metadata["ss_training_comment"] == f"Dynamic resize with {method}: {param} from Dynamic; orig"
            assert LIN32 in out and "average Frobenius norm retention" in out
    # the cap: new-rank 2 wins over any rule
    code, _, err = run_cli("resize", "--model", src, "--save-to", tmp_path / "cap.safetensors", "--new-rank", 2,
                           "--dynamic", "sv_ratio", "--param", 4)
    assert code == 0, err
    assert load_lora(tmp_path / "cap.safetensors").rank_alpha(LIN32)[0] == 2


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def bad_inputs(tmp_path, base):
    model, targets = base
    d = tmp_path / "in"
    d.mkdir()
    good = write(d, "good.safetensors", make_lora(targets, {LIN: (4, 4.0), C3: (2, 2.0)}, seed=40), model)
    good2 = write(d, "good2.safetensors", make_lora(targets, {LIN: (4, 1.0)}, seed=41), model)
    # same module name, another shape (as an SD2 LoRA would have)
    wide = make_lora(targets, {LIN: (4, 4.0)}, seed=42)
    wide[f"{LIN}.lora_down.weight"] = torch.randn(4, 24)
    shape = d / "othershape.safetensors"
    save_lora(wide, shape, {})
    sd2 = d / "sd2.safetensors"
    save_lora(make_lora(targets, {LIN: (4, 4.0)}, seed=43), sd2, {"ss_base_model_version": "sd_v2"})
    trunc = d / "truncated.safetensors"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = d / "notes.safetensors"
    text.write_text("these are my notes, not a LoRA file at all\n" * 10)
    out = tmp_path / "out"
    out.mkdir()
    return dict(good=good, good2=good2, shape=shape, sd2=sd2, trunc=trunc, text=text, out=out, inputs=d)


CASES = [
    # (command builder, file named in the message, words in the message)
    ("merge-shape", lambda f, o: ["merge", "--models", f["good"], f["shape"], "--ratios", 1, 1, "--save-to", o / "m.safetensors"],
     "othershape.safetensors", "different architectures"),
    ("merge-family", lambda f, o: ["merge", "--models", f["good"], f["sd2"], "--save-to", o / "m.safetensors"],
     "sd2.safetensors", "sd_v2"),
    ("svd-merge-family", lambda f, o: ["svd-merge", "--models", f["good"], f["sd2"], "--new-rank", 2,
                                       "--save-to", o / "m.safetensors"], "sd2.safetensors", "sd_v2"),
    ("merge-ratio-count", lambda f, o: ["merge", "--models", f["good"], f["good2"], "--ratios", 1, 0.5, 0.2,
                                        "--save-to", o / "m.safetensors"], "3 ratio(s)", "2 model file(s)"),
    ("svd-merge-ratio-count", lambda f, o: ["svd-merge", "--models", f["good"], f["good2"], "--ratios", 1,
                                            "--save-to", o / "m.safetensors"], "1 ratio(s)", "2 model file(s)"),
    ("merge-truncated", lambda f, o: ["merge", "--models", f["good"], f["trunc"], "--save-to", o / "m.safetensors"],
     "truncated.safetensors", "truncated"),
    ("svd-merge-text", lambda f, o: ["svd-merge", "--models", f["text"], f["good"], "--save-to", o / "m.safetensors"],
     "notes.safetensors", "not a valid safetensors"),
    ("resize-truncated", lambda f, o: ["resize", "--model", f["trunc"], "--save-to", o / "m.safetensors"],
     "truncated.safetensors", "truncated"),
    ("resize-text", lambda f, o: ["resize", "--model", f["text"], "--save-to", o / "m.safetensors"],
     "notes.safetensors", "safetensors"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_lora_input_is_one_line_and_writes_nothing(case, bad_inputs, run_cli):
    _, build, named, words = case
    code, _, err = run_cli(*build(bad_inputs, bad_inputs["out"]))
    assert_one_line_error(code, err, named, words)
    assert_nothing_written(bad_inputs["out"], set())


def test_bad_input_against_a_model_writes_nothing(tmp_path, bad_inputs, tiny_sd1_dir, run_cli):
    out = bad_inputs["out"]
    # a LoRA for another architecture cannot be merged into the model (check_lora_fits)
    code, _, err = run_cli("merge", "--model", tiny_sd1_dir, "--models", bad_inputs["shape"], "--save-to", out / "merged")
    assert_one_line_error(code, err, "othershape.safetensors", "another architecture")
    code, _, err = run_cli("merge", "--model", tiny_sd1_dir, "--models", bad_inputs["sd2"], "--save-to", out / "merged")
    assert_one_line_error(code, err, "sd2.safetensors", "sd_v2")
    # a truncated model file
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    code, _, err = run_cli("extract", "--model-org", tiny_sd1_dir, "--model-tuned", broken, "--save-to", out / "x.safetensors")
    assert_one_line_error(code, err, "broken.safetensors")
    code, _, err = run_cli("merge", "--model", broken, "--models", bad_inputs["good"], "--save-to", out / "m.safetensors")
    assert_one_line_error(code, err, "broken.safetensors")
    assert_nothing_written(out, set())
