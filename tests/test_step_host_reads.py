"""The training step's hot path: a small constant number of tensor-to-host reads per step, whatever the LoRA's size.

Every read a step makes (`Tensor.item`, `bool`, `tolist`, `float`, `int`) waits for the device to finish; before,
a step read every trainable tensor's finiteness (1,444 reads for an SDXL LoRA). Counted between the starts of
consecutive steps, so the loop's own reads (the step losses for the events) count too.
"""

from __future__ import annotations

import pytest
import torch

from conftest import write_job
from difflora.config import load_job
from difflora.train.loop import train

READS = ("item", "__bool__", "tolist", "__float__", "__int__")


def _reads_per_step(monkeypatch, tmp_path, model, data, rank: int) -> list[int]:
    import difflora.train.stages as stages

    count = {"n": 0}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            count["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    at_step: list[int] = []
    real_step = stages.StageRunner._step

    def step(runner, sp, index):
        at_step.append(count["n"])
        return real_step(runner, sp, index)

    monkeypatch.setattr(stages.StageRunner, "_step", step)
    out = tmp_path / f"rank{rank}"
    job = write_job(tmp_path / f"rank{rank}.toml", f'model = "{model}"\nresolution = 16\nmax_train_steps = 6\n'
                    f'network_dim = {rank}\nnetwork_alpha = {rank}\nconv_dim = {rank}\nlearning_rate = 1e-3\n'
                    f'train_data_dir = "{data}"\noutput_dir = "{out}"\noutput_name = "r"\nlog_with = "none"\n')
    train(load_job(job))
    monkeypatch.undo()
    return [b - a for a, b in zip(at_step, at_step[1:])]  # steps 1..5, each with the loop's work after it


def test_a_step_reads_the_device_a_constant_few_times_whatever_the_rank(monkeypatch, tmp_path, tiny_sd1_dir, faces16):
    small = _reads_per_step(monkeypatch, tmp_path, tiny_sd1_dir, faces16, rank=4)
    large = _reads_per_step(monkeypatch, tmp_path, tiny_sd1_dir, faces16, rank=64)
    assert len(small) == 5
    assert max(small) <= 4, small
    assert small == large, (small, large)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_update_is_caught_by_the_next_read(monkeypatch, tmp_path, tiny_sd1_dir, faces16, bad):
    """The finiteness of an update is read with the next step's check (or before any save): training stops with
    the last verified weights, never a non-finite LoRA."""
    from difflora.errors import TrainingStopped
    from difflora.network.files import load_lora

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def ruin_second_update(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(bad)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", ruin_second_update)
    out = tmp_path / "out"
    job = write_job(tmp_path / "j.toml", f'model = "{tiny_sd1_dir}"\nresolution = 16\nmax_train_steps = 4\n'
                    f'train_data_dir = "{faces16}"\noutput_dir = "{out}"\noutput_name = "r"\nlog_with = "none"\n')
    with pytest.raises(TrainingStopped) as info:
        train(load_job(job))
    assert "non-finite weights after the update at step 2" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["r-last-good.safetensors"]
    last_good = load_lora(out / "r-last-good.safetensors")  # refuses NaN / inf
    assert last_good.metadata["ss_steps"] == "0"  # the copy kept at the stage's start
