"""Pair data and the multi-pair average."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from conftest import _write_pairs, write_job
from difflora.config import JobConfig, apply_method_defaults
from difflora.methods import DataSizes, make_method
from difflora.toy.tiny import build_tiny_sd
from difflora.network.apply import network_from_file
from difflora.network.files import save_lora
from difflora.network.lora import LoRANetwork, NetworkSpec
from difflora.network.lowrank import dense_delta, module_names


def _random_net(model, dim, seed):
    torch.manual_seed(seed)
    net = LoRANetwork.create(model.lora_targets(), NetworkSpec(network_dim=dim, network_alpha=dim / 2,
                                                               train_text_encoder=False))
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.normal_(0, 0.1)
    return net


def test_multi_pair_average_is_the_exact_mean_of_the_deltas():
    model = build_tiny_sd("sd1", layout="small")
    job = apply_method_defaults(JobConfig(method="addift", train_data_dir="x", per_pair_average=True))
    method = make_method(job)
    stages = method.stages(DataSizes(3, lambda items: 1))
    assert [s.items for s in stages] == [[0], [1], [2]]
    nets = {s.name: _random_net(model, dim, i) for i, (s, dim) in enumerate(zip(stages, (2, 4, 3)))}
    merged = method.finalize(nets)
    states = [n.kohya_state_dict() for n in nets.values()]
    for name in module_names(states[0]):
        expected = sum(dense_delta(s, name) for s in states) / 3
        torch.testing.assert_close(dense_delta(merged, name), expected, atol=1e-5, rtol=1e-5)
    job.average_rank = 2
    reranked = make_method(job)
    reranked.stages(DataSizes(3, lambda items: 1))
    low = reranked.finalize(nets)
    name = module_names(states[0])[0]
    exact = sum(dense_delta(s, name) for s in states) / 3
    u, s, vh = torch.linalg.svd(exact)
    best2 = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(dense_delta(low, name), best2, atol=1e-5, rtol=1e-4)


def test_fusing_then_unfusing_a_preset_restores_the_base_exactly(tmp_path):
    model = build_tiny_sd("sd1", layout="small")
    net = _random_net(model, 4, 0)
    save_lora(net.kohya_state_dict(), tmp_path / "preset.safetensors", metadata=model.lora_metadata())
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    preset = network_from_file(model, tmp_path / "preset.safetensors", 0.7, attach=False)
    preset.fuse(0.7)
    assert any(not torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())
    preset.unfuse()
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())


def _pair_job(tmp_path, model, pairs, **extra):
    body = (f'model = "{model}"\nmethod = "addift"\nresolution = 16\nmax_train_steps = 2\noutput_dir = "{tmp_path / "out"}"\n'
            f'log_with = "none"\n' + "".join(f"{k} = {v}\n" for k, v in extra.items()) +
            f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{pairs}"\ncaption_extension = ".txt"\n')
    return write_job(tmp_path / "job.toml", body)


def test_missing_partner_names_the_file(tmp_path, tiny_sd1_dir, run_cli):
    pairs = tmp_path / "pairs"
    _write_pairs(pairs, 2, 16)
    (pairs / "001_after.png").unlink()
    code, _, err = run_cli("train", _pair_job(tmp_path, tiny_sd1_dir, pairs))
    assert code == 2 and "001_after.png" in err and "missing" in err


def test_identical_pair_is_reported(tmp_path, tiny_sd1_dir, run_cli):
    pairs = tmp_path / "pairs"
    _write_pairs(pairs, 2, 16)
    (pairs / "001_after.png").write_bytes((pairs / "001.png").read_bytes())
    code, _, err = run_cli("train", _pair_job(tmp_path, tiny_sd1_dir, pairs))
    assert code == 2 and "001.png" in err and "identical" in err
    assert not (tmp_path / "out" / "last.safetensors").exists()


def test_pairs_of_different_sizes_are_resized_with_a_warning(tmp_path, tiny_sd1_dir, run_cli, caplog):
    pairs = tmp_path / "pairs"
    _write_pairs(pairs, 2, 16)
    Image.open(pairs / "000_after.png").resize((24, 24)).save(pairs / "000_after.png")
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli("train", _pair_job(tmp_path, tiny_sd1_dir, pairs))
    assert code == 0, err
    assert any("differ in size" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("method, tables, expected", [
    ("copier", {"copier": {"stage1_steps": 1, "stage2_steps": 1, "stage1_learning_rate": 3e-3,
                           "stage2_learning_rate": 7e-4}}, {"copier": 3e-3, "difference": 7e-4}),
    ("differential", {"differential": {"before_steps": 1, "after_steps": 1, "learning_rate": 2e-3}},
     {"before": 2e-3, "after": 2e-3}),
])
def test_multi_stage_metadata_records_the_learning_rates_that_ran(tmp_path, tiny_sd1_dir, pairs16, method, tables,
                                                                  expected):
    import json

    from difflora.network.files import read_metadata_only
    from difflora.train.loop import train

    job = apply_method_defaults(JobConfig.model_validate({
        "method": method, "model": str(tiny_sd1_dir), "resolution": 16, "learning_rate": 1e-4,
        "datasets": [{"subsets": [{"image_dir": str(pairs16)}]}], "output_dir": str(tmp_path), "log_with": "none",
        **tables}))
    md = read_metadata_only(train(job))
    result_lr = list(expected.values())[-1]  # the file is the last stage's result (B, or B - A)
    assert float(md["ss_learning_rate"]) == result_lr and float(md["ss_unet_lr"]) == result_lr
    assert json.loads(md["difflora_stage_learning_rates"]) == expected
    assert md["ss_max_train_steps"] == md["ss_steps"] == "2"
