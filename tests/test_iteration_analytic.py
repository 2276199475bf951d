"""The assembled TDM iteration (``tdm_core.iteration.tdm_iteration``, the function the trainer runs)
with closed-form Gaussian denoisers as student, fake score and teacher.

Data are isotropic Gaussians ``N(mu, var I)`` in D dimensions. The student is the exact posterior
denoiser of ``N(mu_theta, var I)``, so its K-step trajectory is affine in ``mu_theta`` and the noise,
and every marginal of METHOD.md steps 1-4 is a Gaussian known in closed form. The fake score is the
*ideal* one, the exact score of the student's marginal at ``t`` (which interval ``t`` lies in tells
the step ``i``; ``u = t_{i+1}``). Then the student's TDM gradient must point along the analytic
gradient of ``sum KL(p_theta,t || p_teacher,t)`` over the drawn ``(i, t)``: the reverse KL the
method minimises (METHOD.md step 6).

Everything analytic here is written with its own formulas, not with tdm_core's kernels.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tdm_core import VPSchedule
from tdm_core.iteration import FAKE_SCORE, STUDENT, TDMDenoisers, TDMSettings, TDMUpdates, roll_out, student_objective, tdm_iteration
from tests.helpers.core_updates import recording_updates

D, B, VAR = 16, 4096, 0.25
GRID = (899, 674, 449, 224)
SCHEDULE = VPSchedule.from_config("linear", 0.0001, 0.02, 1000)


def a_s(t) -> tuple[torch.Tensor, torch.Tensor]:
    abar = SCHEDULE.alphas_cumprod.double()[torch.as_tensor(t).long()]
    return abar.sqrt(), (1 - abar).sqrt()


def col(v, x):
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)).to(x.dtype)


def posterior_x0(mean: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # E[x0 | x_t] for x0 ~ N(mean, VAR I): mean + a VAR / (a^2 VAR + s^2) (x_t - a mean)
    a, s = a_s(t)
    gain = col(a * VAR / (a**2 * VAR + s**2), x_t)
    return mean + gain * (x_t - col(a, x_t) * mean)


def student_coefficients(grid=GRID) -> list[tuple[float, float, float, float]]:
    """Per step i: x0_hat_i = p_i mu_theta + q_i z and eps_hat_i = e_i mu_theta + f_i z, for the student's
    roll-out from x_{t_0} = z (affine maps; scalars since everything is isotropic)."""
    out = []
    x_mu, x_z = 0.0, 1.0  # x_{t_0} = z
    for k, t in enumerate(grid):
        a, s = (float(v) for v in a_s(t))
        gain = a * VAR / (a**2 * VAR + s**2)
        p, q = 1 - gain * a + gain * x_mu, gain * x_z  # x0_hat = mu + gain (x - a mu)
        e, f = (x_mu - a * p) / s, (x_z - a * q) / s  # eps_hat = (x - a x0_hat) / s
        out.append((p, q, e, f))
        if k + 1 < len(grid):
            a_n, s_n = (float(v) for v in a_s(grid[k + 1]))
            x_mu, x_z = a_n * p + s_n * e, a_n * q + s_n * f
    return out


def step_of(t: torch.Tensor, grid=GRID) -> torch.Tensor:
    # separate intervals: t in [max(20, t_{i+1}), t_i - 10) identifies i
    ends = torch.tensor(grid)
    return (ends.unsqueeze(0) > t.unsqueeze(1)).sum(1) - 1


def student_marginal_at(t: torch.Tensor, mu_theta: torch.Tensor, grid=GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (B, D) and variance (B,) of x_t = (a_t / a_u) x_u + b n, x_u = a_u x0_hat_i + s_u eps_hat_i."""
    coeffs = torch.tensor(student_coefficients(grid), dtype=torch.float64)
    i = step_of(t, grid)
    ends = torch.tensor(list(grid) + [0])
    u = ends[i + 1]
    p, q, e, f = coeffs[i].unbind(1)
    a_u, s_u = a_s(u)
    a_t, s_t = a_s(t)
    x_u_mu, x_u_z = a_u * p + s_u * e, a_u * q + s_u * f
    b_sq = s_t**2 - (a_t * s_u / a_u) ** 2
    mean = col(a_t / a_u * x_u_mu, mu_theta.unsqueeze(0)) * mu_theta
    return mean, (a_t / a_u * x_u_z) ** 2 + b_sq


def ideal_fake_score(mu_theta: torch.Tensor):
    # the exact score of the student's marginal, as an x0 prediction: x0 = (x_t + s_t^2 score) / a_t
    def fake(x_t, t):
        mean, variance = student_marginal_at(t.long(), mu_theta.detach())
        a_t, s_t = a_s(t.long())
        score = -(x_t - mean) / col(variance, x_t)
        return (x_t + col(s_t**2, x_t) * score) / col(a_t, x_t)

    return fake


def teacher_pair(mu_cond, mu_uncond):
    return lambda x_t, t: (posterior_x0(mu_cond, x_t, t.long()), posterior_x0(mu_uncond, x_t, t.long()))


def analytic_kl_gradient(t: torch.Tensor, mu_theta: torch.Tensor, mu_target: torch.Tensor) -> torch.Tensor:
    """d/dmu_theta of sum_b KL(p_theta,t_b || p_target,t_b), p_target,t = N(a_t mu_target, (a_t^2 VAR + s_t^2) I)."""
    mu = mu_theta.detach().clone().requires_grad_(True)
    mean, _ = student_marginal_at(t, mu)
    a_t, s_t = a_s(t)
    target_var = a_t**2 * VAR + s_t**2
    kl = (((mean - col(a_t, mean) * mu_target) ** 2).sum(1) / (2 * target_var)).sum()  # the mean-dependent part
    (grad,) = torch.autograd.grad(kl, mu)
    return grad


def settings(cfg: float) -> TDMSettings:
    # METHOD.md's iteration, one fake-score update (the ideal fake score here does not learn; several updates:
    # test_the_iteration_in_chunks_is_the_whole_batchs_step and tests/test_option_equivalence.py)
    return TDMSettings(grid=GRID, prediction_type="sample", cfg_scale=cfg, distance="l2", fake_score_updates=1)


def setup(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]
    mu_theta = torch.nn.Parameter(basis[:, 0].clone())  # the student's mean
    mu_cond = 0.5 * basis[:, 1]  # orthogonal to it; mu_uncond = 2 mu_cond puts the w=2 target at 0
    return gen, mu_theta, mu_cond, 2 * mu_cond


def student_denoiser(mu_theta):
    return lambda x_t, t: posterior_x0(mu_theta, x_t, t.long())


def run_iteration(mu_theta, teacher, generator, cfg: float = 2.0):
    """One real tdm_iteration; returns the student's gradient on mu_theta and the drawn diffusion times."""
    denoisers = TDMDenoisers(student=student_denoiser(mu_theta), fake_score=ideal_fake_score(mu_theta), teacher=teacher)
    updates, handed = recording_updates()
    noise = torch.randn(B, D, generator=generator, dtype=torch.float64)
    state = generator.get_state()
    losses = tdm_iteration(denoisers, SCHEDULE, settings(cfg), noise, generator, updates)
    assert [float(loss) for loss in handed[FAKE_SCORE]] == [float(losses.fake_score)]
    # the same draws again, to know the student's (i, t): the roll-out draws nothing, the fake update draws
    # (i, t_i, u, t) then its noise, the student update (i, t_i, u, t)
    from tdm_core.training import draw_training_times

    replay = torch.Generator().manual_seed(0)
    replay.set_state(state)
    draw_training_times(GRID, B, "separate", False, 900, replay)
    torch.randn(B, D, generator=replay)
    _, _, _, t = draw_training_times(GRID, B, "separate", False, 900, replay)
    (grad,) = torch.autograd.grad(handed[STUDENT][0], mu_theta)
    return grad, t


def cosine(x, y) -> float:
    return float(torch.dot(x, y) / (x.norm() * y.norm()))


def test_student_gradient_points_along_the_analytic_reverse_kl_gradient():
    gen, mu_theta, mu_cond, mu_uncond = setup()
    grad, t = run_iteration(mu_theta, teacher_pair(mu_cond, mu_uncond), gen)
    target = mu_uncond + 2.0 * (mu_cond - mu_uncond)  # the CFG w=2 teacher's mean: 0 here
    assert target.abs().max() < 1e-12
    kl_grad = analytic_kl_gradient(t, mu_theta, target)
    assert cosine(grad, kl_grad) > 0.97, cosine(grad, kl_grad)
    # a step against it brings the student's samples towards the guided teacher
    assert torch.dot(grad, mu_theta.detach() - target) > 0


def test_swapping_cond_and_uncond_turns_the_gradient_away():
    # the same check with the teacher's pair swapped (what a cond/uncond mix-up in a host does): the
    # CFG target becomes 3 mu_cond, and the gradient no longer follows the reverse KL to the real target
    gen, mu_theta, mu_cond, mu_uncond = setup()
    grad, t = run_iteration(mu_theta, teacher_pair(mu_uncond, mu_cond), gen)
    kl_grad = analytic_kl_gradient(t, mu_theta, torch.zeros(D, dtype=torch.float64))
    assert cosine(grad, kl_grad) < 0.9, cosine(grad, kl_grad)


def test_guidance_scale_moves_the_target_as_cfg_does():
    # w = 1: the target is the conditional teacher alone (mean mu_cond), the gradient follows its KL
    gen, mu_theta, mu_cond, mu_uncond = setup()
    grad, t = run_iteration(mu_theta, teacher_pair(mu_cond, mu_uncond), gen, cfg=1.0)
    kl_grad = analytic_kl_gradient(t, mu_theta, mu_cond)
    assert cosine(grad, kl_grad) > 0.97, cosine(grad, kl_grad)
    assert cosine(grad, analytic_kl_gradient(t, mu_theta, torch.zeros(D, dtype=torch.float64))) < 0.97


def test_fake_score_learns_from_the_students_own_trajectory_at_each_step():
    # METHOD.md steps 1 and 5 through the real iteration: the student's mean changes with t (mu_theta on
    # the first two steps, mu_late on the last two), the fake score has one learnable mean per step
    # interval, started at 0. Each interval's mean is pulled towards the student's prediction at that
    # step (mu_late shows up in the last two only) and never towards the teacher's mean mu_cond.
    gen, mu_theta, mu_cond, mu_uncond = setup()
    mu_late = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0][:, 2]
    mu_theta = mu_theta.detach()

    def student(x_t, t):
        mean = torch.where((t > 560).unsqueeze(1), mu_theta, mu_late)
        return posterior_x0(mean, x_t, t.long())

    mu_fake = torch.nn.Parameter(torch.zeros(len(GRID), D, dtype=torch.float64))
    denoisers = TDMDenoisers(student=student, fake_score=lambda x_t, t: posterior_x0(mu_fake[step_of(t.long())], x_t, t.long()),
                             teacher=teacher_pair(mu_cond, mu_uncond))
    updates, handed = recording_updates()
    tdm_iteration(denoisers, SCHEDULE, settings(2.0), torch.randn(B, D, generator=gen, dtype=torch.float64), gen, updates)
    (grad,) = torch.autograd.grad(handed[FAKE_SCORE][0], mu_fake)
    for i, descent in enumerate(-grad):
        assert abs(cosine(descent, mu_cond)) < 0.1, (i, cosine(descent, mu_cond))
        along_late = cosine(descent, mu_late)
        assert (along_late > 0.5) if i >= 2 else (abs(along_late) < 0.1), (i, along_late)


def test_each_loss_reaches_only_its_own_parameters():
    # the loss handed to the fake-score update trains the fake score only; the student's the student only
    gen, mu_theta, mu_cond, mu_uncond = setup()
    mu_fake = torch.nn.Parameter(0.9 * mu_theta.detach().clone())
    denoisers = TDMDenoisers(student=student_denoiser(mu_theta), fake_score=student_denoiser(mu_fake),
                             teacher=teacher_pair(mu_cond, mu_uncond))
    updates, handed = recording_updates()
    tdm_iteration(denoisers, SCHEDULE, settings(2.0), torch.randn(64, D, generator=gen, dtype=torch.float64), gen, updates)
    fake_grads = torch.autograd.grad(handed[FAKE_SCORE][0], [mu_theta, mu_fake], allow_unused=True)
    student_grads = torch.autograd.grad(handed[STUDENT][0], [mu_theta, mu_fake], allow_unused=True)
    assert fake_grads[0] is None and fake_grads[1] is not None and fake_grads[1].abs().sum() > 0
    assert student_grads[1] is None and student_grads[0] is not None and student_grads[0].abs().sum() > 0


def test_student_objective_uses_the_drawn_trajectory_points():
    # the student's step starts from its own roll-out points x_{t_i} (detached): replacing the roll-out by
    # pure noise at every step changes the loss
    gen, mu_theta, mu_cond, mu_uncond = setup()
    denoisers = TDMDenoisers(student=student_denoiser(mu_theta), fake_score=ideal_fake_score(mu_theta),
                             teacher=teacher_pair(mu_cond, mu_uncond))
    noise = torch.randn(256, D, generator=gen, dtype=torch.float64)
    rollout = roll_out(denoisers.student, noise, settings(2.0), SCHEDULE)
    state = gen.get_state()
    real = student_objective(denoisers, rollout, settings(2.0), SCHEDULE, gen)
    gen.set_state(state)
    fake_points = type(rollout)([noise] * len(rollout.points), rollout.x0, rollout.eps)
    other = student_objective(denoisers, fake_points, settings(2.0), SCHEDULE, gen)
    assert not torch.allclose(real, other)


def sgd_updates(params: dict):
    """``TDMUpdates`` that back-propagate each role's loss and step its parameter by plain SGD (rate 10), and the
    dict in which each role's last gradient is kept."""
    grads = {}

    def step(role):
        grads[role] = params[role].grad.clone()
        with torch.no_grad():
            params[role] -= 10.0 * params[role].grad
        params[role].grad = None

    return TDMUpdates(backward=lambda role, loss: loss.backward(), step=step), grads


@pytest.mark.parametrize("fake_score_updates", [1, 3])
def test_the_iteration_in_chunks_is_the_whole_batchs_step(fake_score_updates):
    # gradient accumulation in the core: the draws are the whole batch's, each chunk's loss counts by its
    # share of the rows (uneven chunks here), and the fake score steps once, after all its chunks, before
    # the student's chunks read it (a plain SGD step, so a stale fake score would change the student's gradient)
    def run(chunk_size):
        gen, mu_theta, mu_cond, mu_uncond = setup()
        mu_fake = torch.nn.Parameter(0.9 * mu_theta.detach().clone())
        denoisers = TDMDenoisers(student=student_denoiser(mu_theta), fake_score=student_denoiser(mu_fake),
                                 teacher=teacher_pair(mu_cond, mu_uncond))
        updates, grads = sgd_updates({FAKE_SCORE: mu_fake, STUDENT: mu_theta})
        noise = torch.randn(64, D, generator=gen, dtype=torch.float64)
        chosen = dataclasses.replace(settings(2.0), fake_score_updates=fake_score_updates)
        losses = tdm_iteration(denoisers, SCHEDULE, chosen, noise, gen, updates, chunk_size)
        return [losses.fake_score, losses.student, grads[FAKE_SCORE], grads[STUDENT]]

    whole = run(None)
    for got, want in zip(run(24), whole):  # rows 0-23, 24-47, 48-63; the losses are float32 (measured: 8e-8)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert whole[2].abs().sum() > 0 and whole[3].abs().sum() > 0


def test_several_fake_score_updates_step_the_fake_score_first_on_new_draws():
    # fake_score_updates = 3: three fake-score steps on the same roll-out, each on new draws (its first the
    # one-update run's), then the student's step reads the thrice-updated fake score: against the same run whose
    # second and third fake steps are no-ops (same draws, a stale fake score) the student's gradient differs
    def run(updates_per_student, stale_after: int = 99):
        gen, mu_theta, mu_cond, mu_uncond = setup()
        mu_fake = torch.nn.Parameter(0.9 * mu_theta.detach().clone())
        denoisers = TDMDenoisers(student=student_denoiser(mu_theta), fake_score=student_denoiser(mu_fake),
                                 teacher=teacher_pair(mu_cond, mu_uncond))
        params, order, fake_losses, grads = {FAKE_SCORE: mu_fake, STUDENT: mu_theta}, [], [], {}

        def backward(role, loss):
            if role == FAKE_SCORE:
                fake_losses.append(loss.item())
            loss.backward()

        def step(role):
            order.append(role)
            grads[role] = params[role].grad.clone()
            if role == STUDENT or order.count(FAKE_SCORE) <= stale_after:
                with torch.no_grad():
                    params[role] -= 10.0 * params[role].grad
            params[role].grad = None

        chosen = dataclasses.replace(settings(2.0), fake_score_updates=updates_per_student)
        losses = tdm_iteration(denoisers, SCHEDULE, chosen, torch.randn(64, D, generator=gen, dtype=torch.float64), gen,
                               TDMUpdates(backward=backward, step=step))
        return order, fake_losses, grads[STUDENT], losses.fake_score.item()

    one, three, stale = run(1), run(3), run(3, stale_after=1)
    assert one[0] == [FAKE_SCORE, STUDENT] and three[0] == [FAKE_SCORE] * 3 + [STUDENT]
    assert three[1][0] == one[1][0] and len(set(three[1])) == 3  # the first update's draws are the method's; then new ones
    assert three[3] == three[1][-1]  # the returned fake-score loss is the last update's
    assert not torch.allclose(three[2], stale[2])  # the student's target read the further-updated fake score
    with pytest.raises(ValueError, match="at least 1"):
        run(0)


def test_fresh_roll_outs_give_each_later_fake_score_update_new_samples_and_the_student_the_first(monkeypatch):
    # fake_score_rollouts "fresh": the fake score's 2nd and 3rd updates each train on a roll-out of new noise (drawn
    # from the run's generator just before the update), the student's update on the first roll-out; with one
    # update fresh is the shared iteration itself
    def run(updates_per_student, rollouts):
        gen, mu_theta, mu_cond, mu_uncond = setup()
        mu_fake = torch.nn.Parameter(0.9 * mu_theta.detach().clone())
        student, calls = student_denoiser(mu_theta), []

        def recording_student(x_t, t):
            calls.append((x_t.detach().clone(), int(t.flatten()[0]), torch.is_grad_enabled()))
            return student(x_t, t)

        denoisers = TDMDenoisers(student=recording_student, fake_score=student_denoiser(mu_fake),
                                 teacher=teacher_pair(mu_cond, mu_uncond))
        updates, grads = sgd_updates({FAKE_SCORE: mu_fake, STUDENT: mu_theta})
        noise = torch.randn(64, D, generator=gen, dtype=torch.float64)
        chosen = dataclasses.replace(settings(2.0), fake_score_updates=updates_per_student, fake_score_rollouts=rollouts)
        losses = tdm_iteration(denoisers, SCHEDULE, chosen, noise, gen, updates)
        return noise, calls, grads, losses

    from tdm_core import iteration

    trained_on = []  # the roll-out each fake-score update draws its samples from
    real_draws = iteration.fake_score_draws

    def recording_draws(rollout, *args):
        trained_on.append(rollout.points[0].clone())
        return real_draws(rollout, *args)

    monkeypatch.setattr(iteration, "fake_score_draws", recording_draws)
    one_fresh, one_shared = run(1, "fresh"), run(1, "shared")
    for role in (FAKE_SCORE, STUDENT):
        assert torch.equal(one_fresh[2][role], one_shared[2][role])

    trained_on.clear()
    noise, calls, grads, _ = run(3, "fresh")
    fresh_trained_on = list(trained_on)
    trained_on.clear()
    _, shared_calls, shared_grads, _ = run(3, "shared")
    starts = [x for x, t, with_grad in calls if t == GRID[0] and not with_grad]  # each roll-out's first call
    assert len(starts) == 3 and len([c for c in shared_calls if c[1] == GRID[0] and not c[2]]) == 1
    assert torch.equal(starts[0], noise) and not torch.equal(starts[1], noise) and not torch.equal(starts[1], starts[2])
    # update k trains on the k-th roll-out (its own noise); with shared roll-outs every update on the first
    assert len(fresh_trained_on) == 3 and all(torch.equal(got, start) for got, start in zip(fresh_trained_on, starts))
    assert len(trained_on) == 3 and all(torch.equal(got, noise) for got in trained_on)
    assert abs(float(starts[1].std()) - 1) < 0.2  # new standard-normal noise, not a re-use of a roll-out point
    rollout0 = [x for x, _t, with_grad in calls[:len(GRID)]]  # x_{t_0} .. x_{t_{K-1}} of the first roll-out
    (student_input,) = [x for x, _t, with_grad in calls if with_grad]
    for row in range(student_input.shape[0]):  # each row is its own roll-out-0 point at the drawn step
        assert any(torch.equal(student_input[row], point[row]) for point in rollout0)
    assert not torch.allclose(grads[FAKE_SCORE], shared_grads[FAKE_SCORE])  # the last fake update saw other samples
    assert not torch.allclose(grads[STUDENT], shared_grads[STUDENT])
    with pytest.raises(ValueError, match="fake_score_rollouts"):
        run(2, "new")
