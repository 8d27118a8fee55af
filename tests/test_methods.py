"""Each method's loss equals its formula on fixed tensors (a stand-in model with a known response)."""

from __future__ import annotations

import pytest
import torch

from difflora.config import JobConfig, apply_method_defaults
from difflora.methods import Batch, DataSizes, StepContext, make_method
from difflora.methods.addift import addift_loss, addift_timesteps
from difflora.methods.base import common_caption
from difflora.methods.slider import slider_loss
from difflora.methods.standard import denoising_loss
from difflora.models.base import Conditioning
from difflora.models.objectives import EpsilonObjective, VPredictionObjective, objective_for
from difflora.toy.base_model import SCHEDULER_CONFIG


class FakeNetwork:
    """Records the multiplier the way LoRANetwork.set_multiplier is called."""

    def __init__(self):
        self.multiplier = 1.0
        self.calls = []

    def set_multiplier(self, m, component=None):
        self.multiplier = m
        self.calls.append(m)


class FakeModel:
    """prediction = noisy · (1 + multiplier) + 0.1 · t/1000 + mean(caption embedding): known and simple."""

    def __init__(self, net, objective):
        self.net, self.objective = net, objective

    def predict(self, noisy, t, cond):
        m = self.net.multiplier
        m = m.view(-1, 1, 1, 1) if isinstance(m, torch.Tensor) else m
        c = cond.tensors["encoder_hidden_states"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return noisy * (1 + m) + 0.1 * t.view(-1, 1, 1, 1) / 1000 + c


def _encode(captions):
    return Conditioning({"encoder_hidden_states": torch.stack([torch.full((2, 3), float(len(c))) for c in captions])})


def _ctx(job, step=0, objective=None):
    net = FakeNetwork()
    obj = objective or EpsilonObjective.from_scheduler_config(SCHEDULER_CONFIG)
    return StepContext(model=FakeModel(net, obj), network=net, job=job, step=step, encode=_encode), net


def _batch(step=0, n=2, mask=None):
    g = torch.Generator().manual_seed(0)
    shape = (n, 4, 4, 4)
    return Batch(latents={"x": torch.randn(shape, generator=g), "after": torch.randn(shape, generator=g)},
                 captions={"x": ["a face, eyes open"] * n, "after": ["a face, eyes closed"] * n},
                 noise=torch.randn(shape, generator=g), timesteps=torch.tensor([600, 900][:n]),
                 loss_weight=torch.ones(n), step=step,
                 mask_fn=None if mask is None else (lambda threshold, dilate: mask))


def _mse(a, b, w=None):
    e = (a - b) ** 2
    if w is not None:
        e = e * w
    return e.mean(dim=(1, 2, 3))


def test_standard_loss_is_weighted_mse_to_the_objective_target():
    job = JobConfig(method="standard", train_data_dir="x", min_snr_gamma=5.0, prior_loss_weight=0.5)
    for obj in (EpsilonObjective.from_scheduler_config(SCHEDULER_CONFIG),
                VPredictionObjective.from_scheduler_config(SCHEDULER_CONFIG)):
        ctx, net = _ctx(job, objective=obj)
        b = _batch()
        b.loss_weight = torch.tensor([1.0, 0.5])  # the second sample is a regularisation image
        loss = denoising_loss(ctx, b)
        x0, eps, t = b.latents["x"], b.noise, b.timesteps
        noisy = obj.add_noise(x0, eps, t)
        pred = noisy * 2 + 0.1 * t.view(-1, 1, 1, 1) / 1000 + float(len("a face, eyes open"))
        expected = _mse(pred, obj.target(x0, eps, t)) * b.loss_weight * obj.min_snr_weight(t, 5.0)
        torch.testing.assert_close(loss, expected)
        assert net.calls == [1.0]


def test_objectives_match_their_definitions():
    obj = EpsilonObjective.from_scheduler_config(SCHEDULER_CONFIG)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    torch.testing.assert_close(obj.add_noise(x, eps, t), sched.add_noise(x, eps, t))
    v = objective_for("v_prediction", SCHEDULER_CONFIG)
    torch.testing.assert_close(v.target(x, eps, t), sched.get_velocity(x, eps, t))
    flow = objective_for("flow", {})
    torch.testing.assert_close(flow.add_noise(x, eps, t), (1 - t.view(-1, 1, 1, 1) / 1000) * x + t.view(-1, 1, 1, 1) / 1000 * eps)
    torch.testing.assert_close(flow.target(x, eps, t), eps - x)
    snr = obj.snr(t)
    torch.testing.assert_close(obj.min_snr_weight(t, 5.0), torch.clamp(snr, max=5.0) / snr)


@pytest.mark.parametrize("step", [0, 1])
def test_addift_even_step_plus_m_odd_step_minus_m_and_swapped_images(step):
    job = apply_method_defaults(JobConfig(method="addift", train_data_dir="x", addift={"captions": "fixed_roles"}))
    assert job.addift.captions == "own"  # TrainTrain's name for it, accepted as an alias
    ctx, net = _ctx(job, step=step)
    b = _batch(step=step)
    loss = addift_loss(ctx, b)
    obj, m = ctx.model.objective, job.addift.multiplier
    x_o, x_t, eps, t = b.latents["x"], b.latents["after"], b.noise, b.timesteps
    q = lambda x: obj.add_noise(x, eps, t)  # noqa: E731
    c_o, c_t = float(len("a face, eyes open")), float(len("a face, eyes closed"))
    tt = 0.1 * t.view(-1, 1, 1, 1) / 1000
    if step % 2 == 0:  # LoRA at +m on the "after" image, frozen model on "before"
        frozen, pred, mult = q(x_o) + tt + c_o, q(x_t) * (1 + m) + tt + c_t, m
    else:  # swapped images, -m
        frozen, pred, mult = q(x_t) + tt + c_o, q(x_o) * (1 - m) + tt + c_t, -m
    torch.testing.assert_close(loss, _mse(pred, frozen) * obj.min_snr_weight(t, 5.0))
    assert net.calls[0] == 0.0  # the frozen prediction runs with the LoRA off
    assert torch.all(net.calls[1] == mult)


def test_addift_both_directions_in_one_batch_equal_the_two_alternating_steps():
    job = apply_method_defaults(JobConfig(method="addift", train_data_dir="x"))
    b = _batch()
    ctx, _ = _ctx(job, step=0)
    even = addift_loss(ctx, b)
    b1 = _batch(step=1)
    ctx, _ = _ctx(job, step=1)
    odd = addift_loss(ctx, b1)
    job.addift.batch_both_directions = True
    ctx, net = _ctx(job, step=0)
    both = addift_loss(ctx, b)
    torch.testing.assert_close(both, (even + odd) / 2)
    assert net.calls[-1].tolist() == [0.25, 0.25, -0.25, -0.25]


def test_difference_mask_zeroes_the_loss_outside_the_changed_region():
    job = apply_method_defaults(JobConfig(method="addift", train_data_dir="x", addift={"diff_mask": True}))
    b = _batch()
    b.latents["after"] = b.latents["x"].clone()
    b.latents["after"][:, :, 0, 0] += 3.0  # the pair differs in one latent pixel
    inside = torch.zeros(2, 1, 4, 4)
    inside[:, :, 0, 0] = 1
    b.mask_fn = lambda threshold, dilate, m=inside: m
    ctx, _ = _ctx(job)
    masked = addift_loss(ctx, b)
    b.mask_fn = lambda threshold, dilate, m=torch.zeros(2, 1, 4, 4): m  # nothing changed anywhere: no loss at all
    ctx, _ = _ctx(job)
    assert torch.all(addift_loss(ctx, b) == 0)
    b.mask_fn = lambda threshold, dilate, m=inside: m
    # Perturb the prediction only outside the mask: the masked loss must not move.
    ctx, net = _ctx(job)
    original_predict = ctx.model.predict

    def predict_with_outside_noise(noisy, t, cond):
        out = original_predict(noisy, t, cond)
        bump = torch.ones_like(out)
        bump[:, :, 0, 0] = 0
        return out + 5 * bump * (net.multiplier != 0 if not isinstance(net.multiplier, torch.Tensor) else 1)

    ctx.model.predict = predict_with_outside_noise
    torch.testing.assert_close(addift_loss(ctx, b), masked)


def test_addift_stratified_timesteps_cover_every_group_in_turn():
    job = apply_method_defaults(JobConfig(method="addift", train_data_dir="x", addift={"min_timestep": 500}))
    o = job.addift
    draw = addift_timesteps(o, o.min_timestep, o.max_timestep)
    g = torch.Generator().manual_seed(0)
    span = (o.max_timestep - o.min_timestep) / o.timestep_groups
    for step in range(2 * o.timestep_groups):
        t = draw(step, 16, g)
        group = (step // 2) % o.timestep_groups  # a +/- pair of steps shares a group
        assert torch.all(t >= o.min_timestep + span * group) and torch.all(t < o.min_timestep + span * (group + 1) + 1)
        assert len(set(t.tolist())) > 1  # random inside the group, not a fixed value (TrainTrain's bug B1)
    o.replicate_traintrain_timesteps = True
    seq = [int(addift_timesteps(o, 500, 1000)(s, 1, g)) for s in range(10)]
    assert seq == [550, 550, 650, 650, 750, 750, 850, 850, 950, 950]  # the reference's table


def test_addift_common_caption_drops_the_changed_phrase():
    assert common_caption("a face, red hair, eyes open", "a face, red hair, eyes closed") == "a face, red hair"


@pytest.mark.parametrize("captions, after_caption, before_caption", [
    ("common", "a face", "a face"),  # the default: the text cannot explain the difference
    ("own", "a face, eyes closed", "a face, eyes open"),
    ("empty", "", ""),
])
def test_slider_loss_is_plus_s_on_after_minus_s_on_before_against_true_noise(captions, after_caption, before_caption):
    job = apply_method_defaults(JobConfig(method="slider", train_data_dir="x", slider={"scale": 2.0, "captions": captions}))
    ctx, net = _ctx(job)
    b = _batch()
    loss = slider_loss(ctx, b)
    obj = ctx.model.objective
    eps, t = b.noise, b.timesteps
    tt = 0.1 * t.view(-1, 1, 1, 1) / 1000
    pred_after = obj.add_noise(b.latents["after"], eps, t) * 3 + tt + float(len(after_caption))
    pred_before = obj.add_noise(b.latents["x"], eps, t) * (-1) + tt + float(len(before_caption))
    w = obj.min_snr_weight(t, 5.0)
    torch.testing.assert_close(loss, _mse(pred_after, eps) * w + _mse(pred_before, eps) * w)
    assert net.calls[0].tolist() == [2.0, 2.0, -2.0, -2.0]


@pytest.mark.parametrize("captions, expected", [("common", ("common", "common")), ("own", ("x", "after"))])
def test_differential_stages_train_a_on_before_and_b_on_after_with_chosen_captions(captions, expected):
    job = apply_method_defaults(JobConfig(method="differential", train_data_dir="x", differential={"captions": captions}))
    before, after = make_method(job).stages(DataSizes(4, lambda items: 1))
    assert before.loss.keywords == {"image": "x", "caption": expected[0]}
    assert after.loss.keywords == {"image": "after", "caption": expected[1]}
    ctx, _ = _ctx(job)
    b = _batch()
    obj = ctx.model.objective
    noisy = obj.add_noise(b.latents["after"], b.noise, b.timesteps)
    caption = "a face" if captions == "common" else "a face, eyes closed"
    pred = noisy * 2 + 0.1 * b.timesteps.view(-1, 1, 1, 1) / 1000 + float(len(caption))
    torch.testing.assert_close(after.loss(ctx, b), _mse(pred, b.noise) * obj.min_snr_weight(b.timesteps, 5.0))


def test_copier_stage2_keeps_stage1_active_and_trains_on_after_images():
    job = apply_method_defaults(JobConfig(method="copier", train_data_dir="x"))
    stages = make_method(job).stages(DataSizes(4, lambda items: 1))
    assert [s.name for s in stages] == ["copier", "difference"]
    assert stages[1].keep_active == ["copier"]
    assert stages[0].loss.keywords == {"image": "x", "caption": "x"}
    assert stages[1].loss.keywords == {"image": "after", "caption": "x"}


def test_method_defaults_only_fill_unset_keys():
    job = apply_method_defaults(JobConfig(method="addift", train_data_dir="x", learning_rate=5e-4))
    assert job.learning_rate == 5e-4 and job.max_train_steps == 40
    assert apply_method_defaults(JobConfig(method="standard", train_data_dir="x")).max_train_steps == 1600


def test_addift_self_regularisation_term_matches_its_formula():
    job = apply_method_defaults(JobConfig(method="addift", train_data_dir="x",
                                          addift={"captions": "own", "self_reg_weight": 0.5}))
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    b = _batch(mask=mask)
    ctx, net = _ctx(job)
    loss = addift_loss(ctx, b)
    obj, m = ctx.model.objective, job.addift.multiplier
    x_o, x_t, eps, t = b.latents["x"], b.latents["after"], b.noise, b.timesteps
    tt = 0.1 * t.view(-1, 1, 1, 1) / 1000
    c_o, c_t = float(len("a face, eyes open")), float(len("a face, eyes closed"))
    lora_in = obj.add_noise(x_t, eps, t)
    pred = lora_in * (1 + m) + tt + c_t
    frozen_other = obj.add_noise(x_o, eps, t) + tt + c_o
    frozen_same = lora_in + tt + c_t  # the frozen model on the LoRA's own input
    expected = _mse(pred, frozen_other) * obj.min_snr_weight(t, 5.0) + 0.5 * _mse(pred, frozen_same, 1 - mask)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("method", ["addift", "slider"])
def test_unet_only_methods_say_so_when_the_text_encoder_is_asked_for(method, caplog):
    from difflora.errors import UserError

    make_method(apply_method_defaults(JobConfig(method=method, train_data_dir="x")))
    assert "network_train_unet_only" not in caplog.text  # not asked: nothing to say
    job = apply_method_defaults(JobConfig(method=method, train_data_dir="x", network_train_unet_only=False))
    spec = make_method(job).spec()
    assert spec.train_unet and not spec.train_text_encoder
    assert f"method {method} trains the U-Net only" in caplog.text and "network_train_unet_only = false" in caplog.text
    with pytest.raises(UserError, match="network_train_text_encoder_only = true leaves nothing to train"):
        make_method(apply_method_defaults(JobConfig(method=method, train_data_dir="x",
                                                    network_train_text_encoder_only=True)))


@pytest.mark.parametrize("coverage, start", [(0.05, 500), (0.13, 500), (0.19, 500), (0.2, 700), (0.31, 700), (1.0, 700),
                                             (None, 500)])
def test_addift_auto_window_starts_at_700_for_a_change_over_a_fifth_of_the_image(coverage, start):
    from difflora.methods.addift import window_start

    job = apply_method_defaults(JobConfig(method="addift", train_data_dir="x"))
    assert job.addift.min_timestep == "auto" and (job.max_train_steps, job.learning_rate) == (40, 6e-3)
    assert window_start(job.addift, coverage)[0] == start
    sizes = DataSizes(4, lambda items: 1, None if coverage is None else (lambda: coverage))
    stage = make_method(job).stages(sizes)[0]
    t = torch.cat([stage.timesteps(s, 64, torch.Generator().manual_seed(s)) for s in range(20)])
    assert int(t.min()) >= start and int(t.max()) < 1000 and int(t.min()) < start + 50  # the whole window, from start
    explicit = apply_method_defaults(JobConfig(method="addift", train_data_dir="x", addift={"min_timestep": 300}))
    assert window_start(explicit.addift, coverage)[0] == 300
    narrow = apply_method_defaults(JobConfig(method="addift", train_data_dir="x", addift={"max_timestep": 650}))
    assert window_start(narrow.addift, coverage)[0] == 500  # 700 would leave no window


def test_addift_auto_window_refuses_a_window_below_its_local_start():
    with pytest.raises(Exception, match="min_timestep"):
        JobConfig(method="addift", train_data_dir="x", addift={"max_timestep": 400})
    with pytest.raises(Exception, match='a timestep \\(0-999\\) or "auto", got \'foo\''):
        JobConfig(method="addift", train_data_dir="x", addift={"min_timestep": "foo"})
    assert JobConfig(method="addift", train_data_dir="x", addift={"min_timestep": "700"}).addift.min_timestep == 700


def test_addift_auto_window_reads_the_pairs(tmp_path):
    """The shipped toy model: eyes pairs (the pair differs over ~8% of the latent cells) train at
    500-1000, background pairs (~86%) at 700-1000; the file says which window ran."""
    from difflora.network.files import read_metadata_only
    from difflora.toy.evaluate import eval_job, write_pairs
    from difflora.train.loop import train

    for task, start, cached in (("eyes", "500", "true"), ("eyes", "500", "false"), ("glasses", "500", "false"),
                                ("background", "700", "true")):
        if not (tmp_path / f"pairs_{task}_4").exists():
            write_pairs(tmp_path / f"pairs_{task}_4", task, 4, 0)
        job = eval_job(task, "addift", 4, tmp_path, None, 0, ["max_train_steps=1", f"cache_latents={cached}"])
        md = read_metadata_only(train(job))  # uncached: the same latent grid (the model's VAE stride)
        assert (md["ss_min_timestep"], md["difflora_addift_timesteps"]) == (start, f"{start}-1000"), (task, cached)
