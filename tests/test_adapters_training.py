"""Every method trains every adapter: the examples with network_algo = "lokr" / "loha", kohya's
network_module/network_args spelling, resume equals an uninterrupted run, and bad job keys."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from difflora.network.files import load_lora
from test_examples import _run, example_tree  # noqa: F401  (fixture)

EXAMPLES = ["standard", "addift", "copier", "slider", "differential", "per_pair_average"]
OUTPUTS = {"standard": "faces", "addift": "eyes_closed", "copier": "eyes_closed_copier", "slider": "detail_slider",
           "differential": "glasses_diffmerge", "per_pair_average": "neutral_mouth_avg"}


def _trained(lora) -> bool:
    return max(float(v.abs().max()) for k, v in lora.tensors.items()
               if k.endswith(("lora_up.weight", "hada_w2_a", "lokr_w2", "lokr_w2_b"))) > 0


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["lokr", "loha"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_with_lycoris_adapters(example_tree, tiny_sd1_dir, run_cli, name, algo):  # noqa: F811
    out = f"{OUTPUTS[name]}_{algo}"
    code, _, err = _run(run_cli, example_tree, tiny_sd1_dir, name,
                        ["--set", f"network_algo='{algo}'", "--set", "conv_dim=2", "--set", f"output_name='{out}'"])
    assert code == 0, err
    lora = load_lora(example_tree / "output" / f"{out}.safetensors")
    assert _trained(lora)
    algos = {lora.adapter(n).algo for n in lora.module_names()}
    if name in ("differential", "per_pair_average"):  # combined through the dense deltas: a LoRA
        assert algos == {"lora"}
    else:
        assert algos == {algo}
        assert lora.metadata["ss_network_module"] == "lycoris.kohya"
        assert json.loads(lora.metadata["ss_network_args"])["algo"] == algo


def _addift_job(tmp_path, tiny, pairs, **keys):
    body = {"model": f'"{tiny}"', "method": '"addift"',
            "output_dir": f'"{tmp_path / "out"}"', "output_name": '"r"', "max_train_steps": 8, "log_with": '"none"',
            "save_state_every_n_steps": 5, "addift.batch_both_directions": "true", **keys}
    path = tmp_path / "job.toml"
    lines, tables = [], {}
    for k, v in body.items():
        if "." in k:
            t, sub = k.split(".", 1)
            tables.setdefault(t, []).append(f"{sub} = {v}")
        else:
            lines.append(f"{k} = {v}")
    for t, entries in tables.items():
        lines += [f"[{t}]", *entries]
    lines += ["[[datasets]]", "resolution = 16", "[[datasets.subsets]]", f'image_dir = "{pairs}"']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_kohya_lycoris_spelling_trains_the_same_as_difflora_spelling_and_resumes(tmp_path, tiny_sd1_dir, pairs16,
                                                                                 run_cli, monkeypatch):
    """network_module = "lycoris.kohya" + network_args equals network_algo + clear keys; ADDifT with
    per-sample multipliers (batch_both_directions) on DoKr; resume from step 5 ends with the same file."""
    monkeypatch.chdir(tmp_path)
    kohya = _addift_job(tmp_path, tiny_sd1_dir, pairs16, network_module='"lycoris.kohya"', network_dim=4,
                        network_alpha=2, network_args='["algo=lokr", "preset=full", "factor=4", "dora_wd=true", '
                                                      '"conv_dim=2", "conv_alpha=1"]')
    code, _, err = run_cli("train", kohya)
    assert code == 0, err
    full = load_file(str(tmp_path / "out" / "r.safetensors"))
    md = load_lora(tmp_path / "out" / "r.safetensors").metadata  # as sd-scripts writes it for this config
    assert (md["ss_network_module"], md["ss_network_dim"], md["ss_network_alpha"]) == ("lycoris.kohya", "4", "2")
    assert {k: v for k, v in json.loads(md["ss_network_args"]).items() if k in ("preset", "conv_alpha", "dropout")} == \
        {"preset": "full", "conv_alpha": "1", "dropout": None}
    assert any(k.endswith(".dora_scale") for k in full) and any(".lokr_w1" in k for k in full)
    shutil.copytree(tmp_path / "out" / "r-state", tmp_path / "state5")
    (tmp_path / "out" / "r.safetensors").unlink()
    code, _, err = run_cli("train", kohya, "--resume", tmp_path / "state5")
    assert code == 0, err
    resumed = load_file(str(tmp_path / "out" / "r.safetensors"))
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)

    ours = _addift_job(tmp_path, tiny_sd1_dir, pairs16, network_algo='"lokr"', network_factor=4, network_dora="true",
                       conv_dim=2, conv_alpha=1, output_name='"d"', overwrite="true", network_dim=4, network_alpha=2)
    assert run_cli("train", ours)[0] == 0
    same = load_file(str(tmp_path / "out" / "d.safetensors"))
    assert set(full) == set(same) and all(torch.equal(full[k], same[k]) for k in full)


@pytest.mark.parametrize("keys,needles", [
    ({"network_algo": '"lohaa"'}, ("lohaa", "did you mean loha")),
    ({"network_module": '"lycoris.kohya"', "network_args": '["algo=lokr", "factr=4"]'}, ("factr", "factor")),
    ({"network_module": '"lycoris.kohya"', "network_args": '["algo=glora"]'}, ("glora", "does not train")),
    ({"network_args": '["algo=loha"]'}, ("algo", "lycoris.kohya")),
])
def test_bad_adapter_keys_are_one_line_and_nothing_is_written(tmp_path, tiny_sd1_dir, pairs16, run_cli, keys,
                                                               needles):
    job = _addift_job(tmp_path, tiny_sd1_dir, pairs16, **keys)
    code, _, err = run_cli("train", job)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    for needle in (job.name, *needles):
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_presets_may_be_any_adapter(example_tree, tiny_sd1_dir, run_cli):  # noqa: F811
    """A LoKr slider fused as preset under a LoHa ADDifT run; the preset changes what is learned."""
    if not (example_tree / "output" / "detail_slider_lokr.safetensors").exists():
        code, _, err = _run(run_cli, example_tree, tiny_sd1_dir, "slider",
                            ["--set", "network_algo='lokr'", "--set", "conv_dim=2", "--set", "output_name='detail_slider_lokr'"])
        assert code == 0, err
    preset = '[{ path = "../output/detail_slider_lokr.safetensors", multiplier = 1.0 }]'
    runs = {}
    for name, presets in (("with", preset), ("without", "[]")):
        code, _, err = _run(run_cli, example_tree, tiny_sd1_dir, "preset_lora",
                            ["--set", f"preset_loras={presets}", "--set", "network_algo='loha'",
                             "--set", f"output_name='loha_{name}_preset'"])
        assert code == 0, err
        runs[name] = load_lora(example_tree / "output" / f"loha_{name}_preset.safetensors")
    assert "detail_slider_lokr" in runs["with"].metadata["difflora_preset_loras"]
    diffs = [float((runs["with"].tensors[k] - runs["without"].tensors[k]).abs().max()) for k in runs["without"].tensors
             if k.endswith("hada_w2_a")]
    assert max(diffs) > 1e-6


def test_lokr_tucker_core_only_when_asked_and_then_a_warning(tmp_path, tiny_sd1_dir, pairs16, run_cli, caplog):
    """Forge cannot apply `lokr_t2` and ComfyUI skips it: a LoKr job writes none unless network_use_tucker asks for
    it, and then says so once, before training."""
    import logging

    def run(name, **keys):
        job = _addift_job(tmp_path, tiny_sd1_dir, pairs16, network_algo='"lokr"', conv_dim=1, max_train_steps=1,
                          output_name=f'"{name}"', **keys)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="difflora"):
            code, _, err = run_cli("train", job)
        assert code == 0, err
        warned = [r for r in caplog.records if "lokr_t2" in r.getMessage()]
        return load_lora(tmp_path / "out" / f"{name}.safetensors"), warned

    plain, warned = run("plain")
    assert not any(k.endswith(".lokr_t2") for k in plain.tensors) and not warned
    tucker, warned = run("tucker", network_use_tucker="true")
    assert any(k.endswith(".lokr_t2") for k in tucker.tensors)
    assert len(warned) == 1 and "Forge cannot apply" in warned[0].getMessage()
