"""The attack runner (smoothing/attack_runner.py), the seeding streams and the soft smoothed
classifier that library attacks see (issue 8, section 3)."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest
import torch
from torch import nn

from smoothing.attack_runner import (
    AttackOutsideThreatModelError,
    AttackSettings,
    base_margin,
    ceil_norm,
    check_perturbation,
    run_attack,
    with_restarts,
)
from smoothing.attacks import (
    SmoothedSoftClassifier,
    ThreatModel,
    cross_entropy_loss,
    draw_noise,
    smoothadv,
    smoothed_log_probability,
)
from smoothing.core import Smooth
from smoothing.runner import ResultFile, example_generator, example_seed
from tests.tiny_models import one_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def mlp(seed: int, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)  # test set-up only: the library never touches the global RNG
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, classes))


def images(count: int, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 2, 2, generator=generator) * 0.8 + 0.1, i % 4) for i in range(count)]


# ------------------------------------------------------------------------- the streams


def test_stream_zero_is_the_rule_from_before_streams_and_others_are_their_own():
    state = np.random.SeedSequence([7, 12]).generate_state(2, dtype=np.uint32)
    assert example_seed(7, 12) == example_seed(7, 12, 0) == int(state[0]) << 32 | int(state[1])
    for stream in (1, 2, 3):
        state = np.random.SeedSequence([7, 12, stream]).generate_state(2, dtype=np.uint32)
        assert example_seed(7, 12, stream) == int(state[0]) << 32 | int(state[1])
    assert len({example_seed(7, 12, s) for s in range(4)}) == 4
    with pytest.raises(ValueError, match="stream"):
        example_seed(7, 12, -1)


# --------------------------------------------------------------- the soft smoothed classifier


def by_hand(model, x, noise) -> torch.Tensor:
    """log of the mean softmax over the draws, one example at a time, in float64."""
    out = []
    for b in range(x.shape[0]):
        probabilities = torch.softmax(model(x[b : b + 1] + noise), dim=1)  # [m, K]
        out.append(probabilities.mean(dim=0).log())
    return torch.stack(out)


@pytest.mark.parametrize("chunk", [None, 1, 3, 8])
def test_soft_smoothed_classifier_is_the_log_of_the_mean_softmax(chunk):
    model = mlp(0).double()
    x = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = draw_noise(x[:1], 8, 0.5, torch.Generator().manual_seed(2))[0]
    log_p = SmoothedSoftClassifier(model, noise, chunk)(x)
    torch.testing.assert_close(log_p, by_hand(model, x, noise), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_p.exp().sum(dim=1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("chunk", [None, 3])
def test_cross_entropy_on_it_is_smoothadvs_objective_with_its_gradient(chunk):
    model = mlp(3).double()
    x = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.tensor([1, 3])
    noise = draw_noise(x[:1], 8, 0.25, torch.Generator().manual_seed(5))[0]
    x_grad = x.clone().requires_grad_(True)
    loss = cross_entropy_loss(SmoothedSoftClassifier(model, noise, chunk)(x_grad), y)
    (gradient,) = torch.autograd.grad(loss.sum(), x_grad)
    value, objective_gradient = smoothed_log_probability(
        model, x, y, noise.unsqueeze(0).expand(2, *noise.shape)
    )
    torch.testing.assert_close(loss, -value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, -objective_gradient, rtol=1e-10, atol=1e-12)


def test_a_random_model_is_not_chunked():
    model = mlp(0)
    model.random = True
    with pytest.raises(ValueError, match="random model"):
        SmoothedSoftClassifier(model, torch.zeros(4, 3, 2, 2), chunk=2)


# --------------------------------------------------------------------- norms and checks


def test_norms_are_written_rounded_up_exactly():
    assert ceil_norm(0.0) == "0.000000"
    assert ceil_norm(0.25) == "0.250000"
    assert ceil_norm(0.1234561) == "0.123457"
    assert ceil_norm(0.5 + 2**-40) == "0.500001"  # a hair above: never written as 0.5
    assert ceil_norm(0.1) == "0.100001"  # the float 0.1 is 0.1000000000000000055...
    assert ceil_norm(0.123455999999) == "0.123456"
    # for any float: the written value is >= the float's exact value, by less than 1e-6
    values = np.random.default_rng(0).uniform(0, 3, 2000)
    for value in values:
        written = Decimal(ceil_norm(float(value)))
        assert Decimal(float(value)) <= written < Decimal(float(value)) + Decimal("0.000001")


def test_check_perturbation_refuses_points_outside_the_threat_model_or_the_box():
    x = torch.full((1, 3, 2, 2), 0.5)
    threat = ThreatModel("l2", 0.1)
    inside = x + 0.1 / math.sqrt(12)
    l2, linf = check_perturbation(inside, x, threat)
    assert l2 == pytest.approx(0.1, rel=1e-5)  # float32 input
    assert linf == pytest.approx(0.1 / math.sqrt(12), rel=1e-5)
    with pytest.raises(AttackOutsideThreatModelError, match="beyond"):
        check_perturbation(x + 0.2 / math.sqrt(12), x, threat)
    with pytest.raises(AttackOutsideThreatModelError, match="outside"):
        check_perturbation(torch.full_like(x, 1.0 + 1e-6), torch.ones_like(x), threat)
    with pytest.raises(AttackOutsideThreatModelError, match="shaped"):
        check_perturbation(x[0], x, threat)
    with pytest.raises(AttackOutsideThreatModelError, match="NaN"):
        check_perturbation(torch.full_like(x, math.nan), x, threat)
    with pytest.raises(AttackOutsideThreatModelError, match="no attack"):
        check_perturbation(inside, x, None)
    linf_threat = ThreatModel("linf", 0.05)
    check_perturbation(x + 0.05, x, linf_threat)
    with pytest.raises(AttackOutsideThreatModelError):
        check_perturbation(x + 0.051, x, linf_threat)


def test_an_attack_leaving_the_ball_gets_no_row_and_no_file(tmp_path):
    model = mlp(0)
    results = ResultFile(tmp_path / "run", "attack", {"case": "bad"})
    threat = ThreatModel("l2", 0.1)

    def too_far(x, y, generator):
        return (x + 0.05).clamp(0, 1)  # an L2 step of 0.05 * sqrt(12) = 0.17 > eps

    with pytest.raises(AttackOutsideThreatModelError):
        run_attack(model, too_far, images(2), [0, 1], results, AttackSettings(threat),
                   progress=False)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ restarts


def test_restarts_keep_the_lowest_margin_the_earlier_on_ties():
    candidates = [torch.full((1, 1), v) for v in (0.3, 0.1, 0.2, 0.1)]
    calls = iter(candidates)
    chosen = with_restarts(lambda x, y, g: next(calls), 4, lambda x_adv, y, g: x_adv[:, 0])(
        None, None, None)
    assert chosen.item() == pytest.approx(0.1)
    # ties: the earlier restart wins, told apart by a second coordinate the margin ignores
    pairs = iter([torch.tensor([[0.1, 1.0]]), torch.tensor([[0.1, 2.0]])])
    chosen = with_restarts(lambda x, y, g: next(pairs), 2, lambda x_adv, y, g: x_adv[:, 0])(
        None, None, None)
    assert chosen[0, 1].item() == 1.0


def test_base_margin_is_the_logit_gap_to_the_best_other_class():
    model = nn.Identity()
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    margin = base_margin(model)(logits, torch.tensor([0, 2]), None)
    torch.testing.assert_close(margin, torch.tensor([1.0, -2.0]))


# ------------------------------------------------------------ which noise each step sees


class Spy(nn.Module):
    """Records the batches it sees: with autograd on (the attack) and off (evaluations)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.evaluated: list[torch.Tensor] = []

    def forward(self, x):
        if not torch.is_grad_enabled():
            self.evaluated.append(x.detach().clone())
        return self.model(x)


def test_the_attack_and_each_predict_draw_from_their_own_stream(tmp_path, monkeypatch):
    seed, index, sigma, m = 5, 3, 0.25, 16
    spy = Spy(mlp(1))
    smooth = Smooth(spy, 4, sigma)
    predict_seeds, attack_seeds, attacked = [], [], []
    original_predict = Smooth.predict

    def recording_predict(self, x, n, alpha, batch_size, generator=None):
        predict_seeds.append(generator.initial_seed())
        return original_predict(self, x, n, alpha, batch_size, generator)

    monkeypatch.setattr(Smooth, "predict", recording_predict)

    def attack(x, y, generator):
        attack_seeds.append(generator.initial_seed())
        x_adv = smoothadv(spy, x, y, ThreatModel("l2", 0.5), sigma, m=m, steps=3,
                          generator=generator)
        attacked.append(x_adv)
        spy.evaluated.clear()  # what follows is PREDICT on x_adv
        return x_adv

    results = ResultFile(tmp_path / "run", "attack", {"case": "spy"})
    run_attack(spy, attack, images(4), [index], results,
               AttackSettings(ThreatModel("l2", 0.5), seed=seed, n=64, batch_size=64),
               smooth=smooth, progress=False)
    assert attack_seeds == [example_seed(seed, index, 1)]
    assert predict_seeds == [example_seed(seed, index, 0), example_seed(seed, index, 2)]
    # PREDICT's noise on x_adv against the attack's m draws (stream 1, drawn first)
    predict_noise = torch.cat(spy.evaluated)[:64] - attacked[0]
    attack_noise = draw_noise(attacked[0], m, sigma,
                              example_generator(seed, index, "cpu", stream=1))[0]
    distances = torch.cdist(predict_noise.flatten(1), attack_noise.flatten(1))
    assert distances.min() > 0.5 * sigma  # no draw is shared (equal ones are at 0)
    assert predict_noise.std().item() == pytest.approx(sigma, rel=0.2)  # and it is noise


class RandomDefense(nn.Module):
    """A model with a `generator` attribute whose output depends on it (a random purifier)."""

    def __init__(self):
        super().__init__()
        self.model = mlp(2)
        self.generator: torch.Generator | None = None
        self.first_draws: list[float] = []
        # the generators themselves, not their ids: a freed generator's id can be reused
        self._seen: list[torch.Generator] = []

    def forward(self, x):
        draw = torch.rand(1, generator=self.generator)
        if not any(g is self.generator for g in self._seen):  # the first draw of each one
            self._seen.append(self.generator)
            self.first_draws.append(draw.item())
        return self.model(x + 0.01 * draw)


def test_a_random_defense_gets_a_fresh_stream_3_generator_for_each_use(tmp_path):
    seed, index = 2, 1
    defense = RandomDefense()
    results = ResultFile(tmp_path / "run", "attack", {"case": "random"})

    def attack(x, y, generator):
        defense(x)  # the attack uses the defense too
        return x.clone()

    run_attack(defense, attack, images(2), [index], results,
               AttackSettings(ThreatModel("l2", 0.5), seed=seed), progress=False)
    expected = torch.rand(1, generator=example_generator(seed, index, "cpu", 3)).item()
    # clean decision, attack, decision on x_adv: three generators, each fresh from stream 3
    assert defense.first_draws == [expected] * 3
