"""tdm_core.training (METHOD.md "One training iteration") against exact Gaussian results."""
from __future__ import annotations

import math

import pytest
import torch

from tdm_core import FlowSchedule, VPSchedule, reference_grid, x0_eps_from_output
from tdm_core.training import (
    diffuse_u_to_t,
    diffusion_coefficient_b,
    distance_d,
    draw_training_times,
    effective_noise_m,
    fake_score_loss,
    generator_loss,
    generator_normaliser,
    generator_target_x_tilde,
    importance_weight,
    min_snr_weight,
    ode_point,
    pseudo_huber_c_for,
    pseudo_huber_elementwise,
    pseudo_huber_norm,
    sample_diffusion_time,
    sample_ode_point,
    squared_l2,
    teacher_cfg_x0,
)
from tests.helpers.gaussian import GaussianMixture, kl_gaussians_diag

torch.set_num_threads(1)

VP = VPSchedule.from_config()


def coefficients(schedule, *timesteps):
    """(a, s) pairs as float64 scalars for each timestep."""
    return [schedule.alpha_sigma(torch.tensor(float(t))) for t in timesteps]


# ---------------------------------------------------------------- forward diffusion u -> t (step 4)


@pytest.mark.parametrize(
    "schedule,u,t",
    [(VP, 0, 500), (VP, 224, 449), (VP, 600, 980), (FlowSchedule(shift=3.0), 100, 700), (FlowSchedule(), 0, 990)],
)
def test_diffuse_u_to_t_gives_the_exact_marginal_at_t(schedule, u, t):
    """x_u drawn from the exact marginal at u (Gaussian data); x_t must have mean a_t mu, variance
    a_t^2 var + s_t^2 and covariance a_t var with x0. Bounds: 5 standard errors at N samples."""
    n_samples = 200_000
    data = GaussianMixture.single(mean=[1.0, -2.0, 0.0], variance=[0.5, 2.0, 0.05])
    gen = torch.Generator().manual_seed(0)
    x0 = data.sample(n_samples, gen)
    (a_u, s_u), (a_t, s_t) = coefficients(schedule, u, t)
    x_u = a_u * x0 + s_u * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_t = diffuse_u_to_t(x_u, torch.randn(x0.shape, generator=gen, dtype=torch.float64), a_u, s_u, a_t, s_t)
    var_t = data.marginal_variance(a_t, s_t)
    mean_err = (x_t.mean(0) - a_t * data.means[0]) / (var_t / n_samples).sqrt()
    assert mean_err.abs().max() < 5, f"mean off by {mean_err} standard errors"
    var_err = (x_t.var(0) / var_t - 1) / math.sqrt(2 / n_samples)  # relative SE of a Gaussian variance
    assert var_err.abs().max() < 5, f"variance off by {var_err} standard errors"
    cov = ((x_t - x_t.mean(0)) * (x0 - x0.mean(0))).mean(0)
    expected_cov = a_t * data.variances[0]
    cov_se = ((var_t * data.variances[0] + expected_cov**2) / n_samples).sqrt()
    assert ((cov - expected_cov) / cov_se).abs().max() < 5, "x_t must keep a_t x0 of the clean sample"


def test_diffusion_coefficients_are_per_sample_and_exact():
    """Per-sample (B,) coefficients; b^2 = s_t^2 - (a_t s_u / a_u)^2; u = t adds no noise."""
    t_u = torch.tensor([0.0, 224.0, 449.0, 700.0])
    t_t = torch.tensor([20.0, 449.0, 449.0, 889.0])
    a_u, s_u = VP.alpha_sigma(t_u)
    a_t, s_t = VP.alpha_sigma(t_t)
    b = diffusion_coefficient_b(a_u, s_u, a_t, s_t)
    torch.testing.assert_close(b**2, s_t**2 - (a_t * s_u / a_u) ** 2, rtol=1e-10, atol=1e-14)
    assert b[2] == 0.0
    gen = torch.Generator().manual_seed(1)
    x_u = torch.randn(4, 3, 5, generator=gen)
    n = torch.randn(4, 3, 5, generator=gen)
    x_t = diffuse_u_to_t(x_u, n, a_u, s_u, a_t, s_t)
    assert x_t.dtype == x_u.dtype and x_t.shape == x_u.shape
    for k in range(4):
        expected = (a_t[k] / a_u[k]).item() * x_u[k] + b[k].item() * n[k]
        torch.testing.assert_close(x_t[k], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_t[2], x_u[2], rtol=0, atol=0)


def test_effective_noise_m_is_the_noise_of_x_t_around_x0_hat_and_is_standard_normal():
    """x_t = a_t x0_hat + s_t m exactly (step 5), and m ~ N(0, 1) when eps_hat and n are."""
    n_samples = 100_000
    gen = torch.Generator().manual_seed(2)
    x0_hat = torch.randn(n_samples, 4, generator=gen, dtype=torch.float64)
    eps_hat = torch.randn(n_samples, 4, generator=gen, dtype=torch.float64)
    n = torch.randn(n_samples, 4, generator=gen, dtype=torch.float64)
    (a_u, s_u), (a_t, s_t) = coefficients(VP, 300, 650)
    x_t = diffuse_u_to_t(ode_point(x0_hat, eps_hat, a_u, s_u), n, a_u, s_u, a_t, s_t)
    m = effective_noise_m(eps_hat, n, a_u, s_u, a_t, s_t)
    torch.testing.assert_close(x_t, a_t * x0_hat + s_t * m, rtol=1e-10, atol=1e-10)
    assert abs(m.var().item() - 1) < 5 * math.sqrt(2 / m.numel())


def test_ode_point_is_a_u_x0_plus_s_u_eps():
    x0, eps = torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, 0.5]])
    torch.testing.assert_close(ode_point(x0, eps, torch.tensor([0.6]), torch.tensor([0.8])), torch.tensor([[-0.2, 1.6]]))


# ---------------------------------------------------------------- weights and the fake-score loss (step 5)


def test_importance_weight_is_one_when_m_equals_n_and_follows_the_formula():
    gen = torch.Generator().manual_seed(3)
    n = torch.randn(5, 2, 3, 3, generator=gen)
    torch.testing.assert_close(importance_weight(n, n), torch.ones(5))
    m = torch.full((2, 4), 2.0)
    ones = torch.ones(2, 4)
    torch.testing.assert_close(importance_weight(m, ones), torch.full((2,), math.exp(-0.5 * 4 + 0.5 * 1)))
    torch.testing.assert_close(importance_weight(ones, m), torch.full((2,), math.exp(1.5)))


def test_min_snr_weight_is_snr_clamped_at_5():
    t = torch.tensor([0.0, 100.0, 300.0, 500.0, 999.0])
    a, s = VP.alpha_sigma(t)
    snr = (a / s) ** 2
    assert snr[0] > 5 and snr[-1] < 5  # both sides of the clamp are exercised
    torch.testing.assert_close(min_snr_weight(a, s), torch.minimum(snr, torch.full_like(snr, 5.0)))
    a, s = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])  # SNR 4 and 1: unclamped
    torch.testing.assert_close(min_snr_weight(a, s), torch.tensor([4.0, 1.0]))


def test_fake_score_loss_is_weighted_mse_and_only_trains_the_fake_score():
    gen = torch.Generator().manual_seed(4)
    x0_fake = torch.randn(3, 2, 4, generator=gen).requires_grad_(True)
    x0_hat = torch.randn(3, 2, 4, generator=gen).requires_grad_(True)
    weight = torch.tensor([1.0, 0.5, 5.0])
    loss = fake_score_loss(x0_fake, x0_hat, weight)
    expected = (weight * ((x0_fake - x0_hat) ** 2).mean((1, 2))).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert x0_hat.grad is None, "the target sg(x0_hat) must not receive gradient"
    assert x0_fake.grad.abs().sum() > 0
    assert fake_score_loss(x0_hat.detach(), x0_hat.detach(), weight) == 0


# ---------------------------------------------------------------- interval sampling (steps 2-4)

GRID = reference_grid(4, 900)  # 899, 674, 449, 224
T_TOTAL = 900


def test_reference_grid_is_the_papers_rule():
    assert GRID == [899, 674, 449, 224]
    assert reference_grid(1, 800) == [799]
    assert reference_grid(2, 1000) == [999, 499]


@pytest.mark.parametrize("randmid", [False, True])
@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_draw_training_times_ranges_are_exactly_method_steps_3_and_4(mode, randmid):
    n = 40_000
    i, t_i, u, t = draw_training_times(GRID, n, mode, randmid, T_TOTAL, torch.Generator().manual_seed(5))
    assert i.dtype == t_i.dtype == u.dtype == t.dtype == torch.long
    ends = GRID + [0]
    counts = torch.bincount(i, minlength=4).double()
    assert ((counts - n / 4).abs() < 5 * math.sqrt(n * 0.25 * 0.75)).all(), f"step index not uniform: {counts}"
    for k in range(4):
        sel = i == k
        assert (t_i[sel] == ends[k]).all()
        u_k, t_k = u[sel], t[sel]
        if randmid:  # u uniform in [t_{i+1}, t_i - 20)
            assert u_k.min() == ends[k + 1] and u_k.max() == ends[k] - 21
        else:
            assert (u_k == ends[k + 1]).all()
        low = torch.clamp(u_k, min=20)
        high = ends[k] - 10 if mode == "separate" else T_TOTAL - 10
        assert (t_k >= low).all() and (t_k < high).all()
        assert t_k.max() == high - 1
        if not randmid:  # (with randmid the lowest t needs the lowest u too: too rare to demand)
            assert t_k.min() == max(20, ends[k + 1])
    if mode == "separate" and not randmid:  # the steps' intervals never overlap
        ranges = [set(t[i == k].tolist()) for k in range(4)]
        assert all(not (ranges[a] & ranges[b]) for a in range(4) for b in range(a + 1, 4))


def test_diffusion_time_is_uniform_in_its_interval():
    n = 50_000
    u = torch.full((n,), 224, dtype=torch.long)
    t_i = torch.full((n,), 449, dtype=torch.long)
    t = sample_diffusion_time(u, t_i, "separate", T_TOTAL, torch.Generator().manual_seed(6))
    counts = torch.bincount(t - 224, minlength=215).double()  # values 224 .. 438
    assert counts.shape[0] == 215
    expected = n / 215
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 214 + 5 * math.sqrt(2 * 214), f"chi-square {chi2} with 214 degrees of freedom"


def test_sample_ode_point_without_randmid_is_t_next_and_errors_are_clear():
    t_i, t_next = torch.tensor([899, 224]), torch.tensor([674, 0])
    assert torch.equal(sample_ode_point(t_i, t_next, randmid=False), t_next)
    with pytest.raises(ValueError, match="interval mode 'both'"):
        sample_diffusion_time(t_next, t_i, "both", 900)


# ---------------------------------------------------------------- generator target and loss (steps 6-7)


def test_teacher_cfg_is_uncond_plus_w_times_the_difference():
    cond, uncond = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(teacher_cfg_x0(cond, uncond, 4.5), uncond + 4.5 * (cond - uncond))
    torch.testing.assert_close(teacher_cfg_x0(cond, uncond, 1.0), cond)


@pytest.mark.parametrize("distance", ["l2", "huber", "huber_norm"])
def test_fake_equal_to_teacher_gives_x0_hat_as_target_and_zero_gradient(distance):
    gen = torch.Generator().manual_seed(7)
    x0_hat = torch.randn(3, 2, 4, 4, generator=gen).requires_grad_(True)
    teacher = torch.randn(3, 2, 4, 4, generator=gen)
    x_tilde = generator_target_x_tilde(x0_hat, teacher, teacher + 5.0, teacher.clone(), cfg=1.0)
    assert not x_tilde.requires_grad
    torch.testing.assert_close(x_tilde, x0_hat.detach(), rtol=0, atol=0)
    nrm = generator_normaliser(x0_hat, teacher)
    loss = generator_loss(x0_hat, x_tilde, nrm, distance)
    loss.backward()
    assert torch.isfinite(x0_hat.grad).all() and (x0_hat.grad == 0).all()


def test_generator_target_with_cfg_and_normaliser_follow_step_6():
    gen = torch.Generator().manual_seed(8)
    x0_hat, cond, uncond, fake = (torch.randn(2, 3, generator=gen) for _ in range(4))
    x_tilde = generator_target_x_tilde(x0_hat, cond, uncond, fake, cfg=4.5)
    torch.testing.assert_close(x_tilde, x0_hat + teacher_cfg_x0(cond, uncond, 4.5) - fake)
    nrm = generator_normaliser(x0_hat.requires_grad_(True), teacher_cfg_x0(cond, uncond, 4.5))
    assert not nrm.requires_grad
    torch.testing.assert_close(nrm, (x0_hat - teacher_cfg_x0(cond, uncond, 4.5)).abs().mean(1).detach())
    loss = generator_loss(x0_hat, x_tilde, nrm)
    torch.testing.assert_close(loss, (((x0_hat - x_tilde) ** 2).mean(1) / nrm).mean())
    torch.testing.assert_close(generator_loss(x0_hat, x_tilde, 2 * nrm), loss / 2)


def generator_gradient(student: GaussianMixture, teacher: GaussianMixture, student_mean, student_std, distance: str, seed: int):
    """One TDM student update for a one-step student x0_hat = mean + std * noise, run through the
    kernels of steps 2-7 with exact x0 posteriors as teacher and fake score; returns d loss."""
    grid, n = [899], 4096
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, student.dim, generator=gen, dtype=torch.float64)
    _, t_i, u, t = draw_training_times(grid, n, "separate", False, T_TOTAL, gen)
    a0, s0 = VP.alpha_sigma(t_i.double())
    x0_hat = student_mean + student_std * noise  # the student's one step, with gradient
    _, eps_hat = x0_eps_from_output(x0_hat, noise, a0, s0, "sample")
    a_u, s_u = VP.alpha_sigma(u.double())
    a_t, s_t = VP.alpha_sigma(t.double())
    x_t = diffuse_u_to_t(ode_point(x0_hat, eps_hat, a_u, s_u), torch.randn(noise.shape, generator=gen, dtype=torch.float64), a_u, s_u, a_t, s_t)
    with torch.no_grad():
        x0_teacher = teacher.posterior_x0_eps(x_t, a_t, s_t)[0]
        x0_fake = student.posterior_x0_eps(x_t, a_t, s_t)[0]  # a perfect fake score knows the student
    x_tilde = generator_target_x_tilde(x0_hat, x0_teacher, x0_teacher, x0_fake, cfg=1.0)
    loss = generator_loss(x0_hat, x_tilde, generator_normaliser(x0_hat, x0_teacher), distance)
    return torch.autograd.grad(loss, [student_mean, student_std])


@pytest.mark.parametrize("distance", ["l2", "huber_norm", "huber"])
def test_generator_gradient_points_along_the_kl_gradient_of_the_means(distance):
    """Student N(m1, v), teacher N(m2, v): d loss / d m1 is parallel to d KL(student||teacher) / d m1.

    Element-wise pseudo-Huber with c = 1e-3 is L1-like: its gradient is the sign of the KL gradient."""
    dim, var = 6, 0.5
    m1 = torch.tensor([0.5, -1.0, 0.3, 2.0, 0.0, -0.4], dtype=torch.float64, requires_grad=True)
    m2 = torch.tensor([0.0, 0.5, 0.3, 1.0, -1.0, 0.6], dtype=torch.float64)
    std = torch.full((dim,), var**0.5, dtype=torch.float64, requires_grad=True)
    student = GaussianMixture.single(m1.detach(), var)
    teacher = GaussianMixture.single(m2, var)
    grad_mean, _ = generator_gradient(student, teacher, m1, std, distance, seed=9)
    kl_grad = torch.autograd.grad(kl_gaussians_diag(m1, std**2, m2, torch.full_like(m2, var)), m1)[0]
    assert (torch.sign(grad_mean) == torch.sign(kl_grad)).all(), f"gradient {grad_mean} vs KL gradient {kl_grad}"
    if distance != "huber":
        cosine = torch.nn.functional.cosine_similarity(grad_mean, kl_grad, dim=0).item()
        assert cosine > 0.99, f"cosine {cosine}: gradient {grad_mean} vs KL gradient {kl_grad}"


@pytest.mark.parametrize("student_var,teacher_var", [(2.0, 0.5), (0.3, 1.5)])
def test_generator_gradient_on_the_spread_has_the_sign_of_the_kl_gradient(student_var, teacher_var):
    """Student N(m, v1), teacher N(m, v2): the update widens a too-narrow student and narrows a too-wide one."""
    dim = 4
    mean = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    std = torch.full((dim,), student_var**0.5, dtype=torch.float64, requires_grad=True)
    student = GaussianMixture.single(torch.zeros(dim), student_var)
    teacher = GaussianMixture.single(torch.zeros(dim), teacher_var)
    _, grad_std = generator_gradient(student, teacher, mean, std, "l2", seed=10)
    kl_grad = torch.autograd.grad(kl_gaussians_diag(torch.zeros(dim, dtype=torch.float64), std**2, torch.zeros(dim, dtype=torch.float64), torch.full((dim,), teacher_var, dtype=torch.float64)), std)[0]
    assert (torch.sign(grad_std) == torch.sign(kl_grad)).all(), f"gradient {grad_std} vs KL gradient {kl_grad}"


# ---------------------------------------------------------------- distances (step 7)


def test_pseudo_huber_small_c_limit_is_absolute_value_and_l2_norm():
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(3, 2, 5, 5, generator=gen), torch.randn(3, 2, 5, 5, generator=gen)
    torch.testing.assert_close(pseudo_huber_elementwise(x, y, c=1e-8), (x - y).abs().mean((1, 2, 3)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pseudo_huber_norm(x, y, c=1e-8), (x - y).flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)


def test_pseudo_huber_large_c_limit_is_half_squared_over_c():
    gen = torch.Generator().manual_seed(12)
    x, y = torch.randn(3, 2, 5, 5, generator=gen), torch.randn(3, 2, 5, 5, generator=gen)
    c = 1e4  # |diff| / c ~ 1e-4: the next term of the expansion is 1e-8 relative
    torch.testing.assert_close(pseudo_huber_elementwise(x, y, c=c), ((x - y) ** 2 / (2 * c)).mean((1, 2, 3)), rtol=1e-4, atol=0)
    torch.testing.assert_close(pseudo_huber_norm(x, y, c=c), ((x - y) ** 2).sum((1, 2, 3)) / (2 * c), rtol=1e-4, atol=0)


@pytest.mark.parametrize("distance", ["l2", "huber", "huber_norm"])
def test_distance_gradients_are_finite_and_zero_at_zero_difference(distance):
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(13)).requires_grad_(True)
    distance_d(distance, x, x.detach().clone()).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


def test_distance_defaults_are_the_documented_c():
    gen = torch.Generator().manual_seed(14)
    x, y = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    c_norm = 0.00054 * math.sqrt(4 * 8 * 8)  # paper (iCT): per-sample norm, c = 0.00054 sqrt(dim)
    assert pseudo_huber_c_for(x) == pytest.approx(c_norm, rel=1e-12)
    sq_norm = ((x - y) ** 2).sum((1, 2, 3))
    torch.testing.assert_close(distance_d("huber_norm", x, y), (sq_norm + c_norm**2).sqrt() - c_norm)
    diff = x - y  # reference script: element-wise, c = 1e-3
    torch.testing.assert_close(distance_d("huber", x, y), ((diff**2 + 1e-6).sqrt() - 1e-3).mean((1, 2, 3)))
    torch.testing.assert_close(distance_d("l2", x, y), squared_l2(x, y))
    torch.testing.assert_close(squared_l2(x, y), (diff**2).mean((1, 2, 3)))
    with pytest.raises(ValueError, match="unknown distance 'l1'"):
        distance_d("l1", x, y)
    with pytest.raises(ValueError, match="c=0.0 must be positive"):
        distance_d("huber", x, y, c=0.0)
