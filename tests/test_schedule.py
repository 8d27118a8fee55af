"""When samples and saves are due: the cheap default sampling, no step sampled twice, sample/save on request."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

from difflora.prompts import SamplePrompt
from difflora.train.schedule import (SAMPLING_SHARE, OnDemand, SaveSchedule, auto_sample_every, sampler_calls,
                                     signals_on_demand)


def job(**set_):
    keys = dict(sample_every_n_steps=None, sample_every_n_epochs=None, sample_at_first=False, save_every_n_steps=None,
                save_every_n_epochs=None, save_state=False, save_state_every_n_steps=None,
                gradient_accumulation_steps=1)
    return SimpleNamespace(**{**keys, **set_})


def sampled_steps(schedule: SaveSchedule, steps: int) -> list[int]:
    """The steps sampled in a one-stage run, the end-of-run pass included."""
    out = [d for d in range(1, steps + 1) if schedule.after_step(d, steps, per_epoch=4).sample]
    return out + ([steps] if schedule.sample_at_end() else [])


def test_default_sampling_keeps_under_its_share_of_the_run():
    prompts = [SamplePrompt("a face", steps=10)]
    assert sampler_calls(prompts + [SamplePrompt("b", steps=20)]) == 30
    # 40 steps against a 10-call pass: a pass is a quarter of the training already, so only the finished LoRA
    assert auto_sample_every(40, 10) is None
    assert sampled_steps(SaveSchedule(job(), prompts, 40), 40) == [40]
    for total in (100, 400, 1000):
        steps = sampled_steps(SaveSchedule(job(), prompts, total), total)
        passes_cost = len(steps) * 10  # a sampler call costs about a step (STEPS_PER_SAMPLER_CALL)
        assert passes_cost / (passes_cost + total) <= SAMPLING_SHARE + 1e-9, (total, steps)
        assert len(steps) == len(set(steps)) and steps[-1] == total  # never twice, the end always
    assert sampled_steps(SaveSchedule(job(), prompts, 400), 400) == [40 * i for i in range(1, 11)]
    # accumulation makes a step dearer, so samples come more often
    assert auto_sample_every(400, 10, accumulation=2) == 20
    # no prompts: no sampling, ever
    assert sampled_steps(SaveSchedule(job(), [], 400), 400) == []


def test_a_chosen_interval_is_kept_and_the_last_step_is_sampled_once():
    prompts = [SamplePrompt("a face", steps=30)]
    assert sampled_steps(SaveSchedule(job(sample_every_n_steps=5), prompts, 20), 20) == [5, 10, 15, 20]
    assert sampled_steps(SaveSchedule(job(sample_every_n_epochs=2), prompts, 16), 16) == [8, 16]
    # a stage's last step before the end: left to the final pass too (kohya sampled both)
    schedule = SaveSchedule(job(sample_every_n_steps=4), prompts, 8)
    assert [schedule.after_step(d, 8, 1).sample for d in (4, 8)] == [True, False]


def test_sample_now_and_save_now_are_served_after_the_next_step():
    on_demand = OnDemand()
    schedule = SaveSchedule(job(), [SamplePrompt("a", steps=10)], 40, on_demand)
    with signals_on_demand(on_demand):
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored
    due = schedule.after_step(7, 40, 4)
    assert due.sample and due.lora_tag == "step00000007" and due.state
    again = schedule.after_step(8, 40, 4)
    assert not again.sample and again.lora_tag is None and not again.state  # served once
    on_demand.sample.set()
    assert not schedule.after_step(40, 40, 4).sample  # the last step: the final pass samples it anyway
    without_prompts = SaveSchedule(job(), [], 40, OnDemand())
    without_prompts.on_demand.sample.set()
    assert not without_prompts.after_step(3, 40, 4).sample
