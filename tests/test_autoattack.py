"""Tests of cli/autoattack.py, the adapter to pyautoattack (fra31/auto-attack's code).

Known answers come from linear classifiers over the flattened 1x8x8 image, as in
test_attacks.py: for a binary one with v = W[y] - W[other] (the normal of the boundary,
pointing to y), cross-entropy grows along -v everywhere, so APGD-CE's iterates walk to
x - eps v/|v| (L2) or x - eps sign(v) (Linf) and stop at the ball's edge. A point nearer
than eps to the boundary (|margin| / |v|_2 for L2, / |v|_1 for Linf) is flipped and
the library returns that last adversarial iterate; a point farther than eps cannot be
flipped by any perturbation, and the library then returns x itself. The library works
in float32, so the known answers hold to float32 accuracy.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest
import torch
from torch import nn

import cli.autoattack as adapter
from cli.autoattack import autoattack, autoattack_settings, require_autoattack
from cli.errors import CommandError
from tests.tiny_models import one_thread

SHAPE = (1, 8, 8)
DIMS = 64

needs_library = pytest.mark.skipif(
    importlib.util.find_spec("pyautoattack") is None,
    reason="the autoattack extra is not installed: pip install 'robustify[autoattack]'",
)


single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear(seed: int, classes: int) -> nn.Linear:
    layer = nn.Linear(DIMS, classes)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(classes, DIMS, generator=seeded(seed)))
        layer.bias.zero_()
    return layer.eval()


def flat(layer: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Flatten(), layer).eval()


def predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


def norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    order = 2 if norm == "l2" else float("inf")
    return torch.linalg.vector_norm(delta.double().flatten(1), ord=order, dim=1)


def binary_at_distances(seed: int, norm: str, distances: list[float]):
    """A linear binary classifier and points at the given signed distances (in `norm`)
    from its boundary (negative: class 0's side), their labels and normals toward them."""
    layer = linear(seed, 2)
    normal = (layer.weight[1] - layer.weight[0]).detach()  # toward class 1
    x = 0.35 + 0.3 * torch.rand((len(distances), DIMS), generator=seeded(seed + 100))
    margin = x @ normal  # logit 1 - logit 0 (no bias)
    if norm == "l2":
        direction, scale = normal / normal.norm(), normal.norm()
    else:
        direction, scale = normal.sign(), normal.abs().sum()  # moves the margin by |v|_1
    target = torch.tensor(distances) * scale
    x = x + ((target - margin) / scale)[:, None] * direction
    x = x.view(-1, *SHAPE)
    model = flat(layer)
    y = predicted(model, x)
    assert y.tolist() == [int(d > 0) for d in distances]
    v = torch.where(y[:, None] == 1, normal, -normal).view(-1, *SHAPE)
    return model, x, y, v


# ---------------------------------------------------------------- known answers


@needs_library
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apgd_ce_l2_reaches_the_known_point_and_flips_only_points_nearer_than_eps(seed):
    eps = 0.25
    distances = [-0.45, -0.3, -0.15, -0.05, 0.1, 0.2, 0.35, 0.6]
    model, x, y, v = binary_at_distances(seed, "l2", distances)
    expected = x - eps * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert expected.min() > 0 and expected.max() < 1  # interior: the box is not active
    x_adv = autoattack(model, x, y, attack="apgd-ce", norm="l2", eps=eps, seed=seed)
    near = torch.tensor([abs(d) < eps for d in distances])
    flipped = predicted(model, x_adv) != y
    assert flipped.tolist() == near.tolist()
    torch.testing.assert_close(x_adv[near], expected[near], rtol=0, atol=2e-5)
    assert torch.equal(x_adv[~near], x[~near])  # nothing found: the clean input
    assert bool((norms(x_adv - x, "l2") <= eps * (1 + 1e-5)).all())


@needs_library
@pytest.mark.parametrize("seed", [0, 1])
def test_apgd_ce_linf_reaches_the_corner_and_flips_only_points_nearer_than_eps(seed):
    eps = 8 / 255
    distances = [-2.0 * eps, -0.8 * eps, -0.3 * eps, 0.5 * eps, 1.3 * eps, 3.0 * eps]
    model, x, y, v = binary_at_distances(seed, "linf", distances)
    expected = x - eps * v.sign()
    assert expected.min() > 0 and expected.max() < 1
    x_adv = autoattack(model, x, y, attack="apgd-ce", norm="linf", eps=eps, seed=seed)
    near = torch.tensor([abs(d) < eps for d in distances])
    assert (predicted(model, x_adv) != y).tolist() == near.tolist()
    torch.testing.assert_close(x_adv[near], expected[near], rtol=0, atol=1e-6)
    assert torch.equal(x_adv[~near], x[~near])
    assert bool((norms(x_adv - x, "linf") <= eps * (1 + 1e-5)).all())


def multiclass_batch(seed: int, norm: str, classes: int = 10):
    """A linear 10-class model, interior points and each point's distance (in `norm`) to
    the nearest decision boundary: min over j != y of (z_y - z_j) / |w_y - w_j|_dual."""
    layer = linear(seed, classes)
    model = flat(layer)
    x = 0.3 + 0.4 * torch.rand((12, *SHAPE), generator=seeded(seed + 7))
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(dim=1)
    weight = layer.weight.detach()
    dual = 2 if norm == "l2" else 1
    distances = []
    for i in range(x.shape[0]):
        gaps = [
            float((logits[i, y[i]] - logits[i, j]) / torch.linalg.vector_norm(
                weight[y[i]] - weight[j], ord=dual))
            for j in range(classes) if j != y[i]
        ]
        distances.append(min(gaps))
    return model, x, y, torch.tensor(distances)


class CountGradients(nn.Module):
    """Counts the calls that evaluate a gradient (the input requires grad)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.gradient_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            self.gradient_calls += 1
        return self.inner(x)


def near_and_far(seed: int, norm: str, eps: float):
    """Two points clearly within eps of a boundary, then two clearly beyond (no
    perturbation of norm <= eps changes their class)."""
    model, x, y, distances = multiclass_batch(seed, norm)
    near = torch.nonzero(distances < 0.6 * eps).flatten()[:2]
    far = torch.nonzero(distances > 1.5 * eps).flatten()[:2]
    assert len(near) == 2 and len(far) == 2
    chosen = torch.cat([near, far])
    return model, x[chosen], y[chosen]


@needs_library
@pytest.mark.parametrize(("norm", "eps"), [("l2", 0.12), ("linf", 0.02)])
def test_apgd_t_on_ten_classes_flips_exactly_the_points_within_eps(norm, eps):
    model, x, y = near_and_far(1, norm, eps)
    x_adv = autoattack(model, x, y, attack="apgd-t", norm=norm, eps=eps, seed=3, steps=30)
    assert (predicted(model, x_adv) != y).tolist() == [True, True, False, False]
    assert torch.equal(x_adv[2:], x[2:])
    assert bool((norms(x_adv - x, norm) <= eps * (1 + 1e-5)).all())


@needs_library
def test_standard_autoattack_on_points_apgd_ce_flips_skips_the_other_attacks():
    model, x, y = near_and_far(1, "l2", 0.12)
    counter = CountGradients(model)
    x_adv = autoattack(counter, x[:2], y[:2], attack="autoattack", norm="l2", eps=0.12, seed=0)
    assert (predicted(model, x_adv) != y[:2]).all()
    assert counter.gradient_calls == 1 + 101  # the probe, then APGD-CE alone


@pytest.mark.slow  # Square's 5000 queries and FAB-T's 9 x 100 iterations: ~10 s here
@needs_library
def test_standard_autoattack_flips_exactly_the_points_within_eps_of_a_boundary():
    eps = 0.12
    model, x, y = near_and_far(1, "l2", eps)
    x_adv = autoattack(model, x, y, attack="autoattack", norm="l2", eps=eps, seed=3)
    assert (predicted(model, x_adv) != y).tolist() == [True, True, False, False]
    assert torch.equal(x_adv[2:], x[2:])
    assert bool((norms(x_adv - x, "l2") <= eps * (1 + 1e-5)).all())


@needs_library
@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-t", "autoattack-rand"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_the_result_lies_in_the_ball_and_the_box(attack, norm):
    # pixels at 0 and 1 and a large eps: the box is active, the ball too
    model = flat(linear(5, 10))
    x = torch.rand((6, *SHAPE), generator=seeded(5)).round()
    x[:, :, :4] = torch.rand((6, 1, 4, 8), generator=seeded(6))
    y = predicted(model, x)
    eps = 1.5 if norm == "l2" else 0.2
    x_adv = autoattack(model, x, y, attack=attack, norm=norm, eps=eps, seed=0, steps=20)
    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert bool((norms(x_adv - x, norm) <= eps * (1 + 1e-5)).all())
    assert bool((predicted(model, x_adv) != y).any())  # the attack did something


@needs_library
def test_a_float64_batch_comes_back_in_float64_inside_the_ball():
    # the library attacks in float32; the result is cast back and checked in float64
    model, x, y, v = binary_at_distances(0, "l2", [-0.1, 0.2])
    x = x.double()
    x_adv = autoattack(model, x, y, attack="apgd-ce", norm="l2", eps=0.25, seed=0)
    assert x_adv.dtype == torch.float64
    assert (predicted(model, x_adv.float()) != y).all()
    assert bool((norms(x_adv - x, "l2") <= 0.25 * (1 + 1e-5)).all())


@needs_library
def test_float_rounding_excess_is_projected_and_more_is_refused(monkeypatch):
    import pyautoattack

    model = flat(linear(0, 10))
    x = 0.3 + 0.4 * torch.rand((2, *SHAPE), generator=seeded(0))
    y = predicted(model, x)
    eps = 0.5
    direction = torch.randn(x.shape, generator=seeded(1))
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    returned = {}

    def fake_evaluation(self, x_orig, y_orig, /, *, batch_size=250, state_path=None):
        return x_orig + returned["scale"] * eps * direction, y_orig

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", fake_evaluation)
    returned["scale"] = 1 + 3e-5  # what float32 arithmetic can leave over
    x_adv = autoattack(model, x, y, attack="apgd-ce", norm="l2", eps=eps, seed=0)
    distance = norms(x_adv - x, "l2")
    assert bool((distance <= eps * (1 + 1e-6)).all()) and bool((distance > eps * 0.9999).all())
    returned["scale"] = 1.01  # a library bug, not rounding: never returned
    with pytest.raises(RuntimeError, match="beyond float rounding"):
        autoattack(model, x, y, attack="apgd-ce", norm="l2", eps=eps, seed=0)


# ---------------------------------------------------------------- seeding


def small_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the test's own init; the adapter must not depend on it
    return nn.Sequential(nn.Flatten(), nn.Linear(DIMS, 32), nn.Tanh(), nn.Linear(32, 10)).eval()


@needs_library
def test_the_result_depends_on_the_seed_and_on_nothing_run_before():
    model = small_mlp(0)
    x = torch.rand((6, *SHAPE), generator=seeded(2))
    y = predicted(model, x)
    options = {"attack": "apgd-ce", "norm": "l2", "eps": 1.0, "steps": 10}
    first = autoattack(model, x, y, seed=11, **options)
    assert bool((predicted(model, first) != y).any())  # flipped points carry the random start
    # other work in between: global RNG draws, reseeding, another attack
    torch.manual_seed(12345)
    torch.rand(1000)
    autoattack(model, x[:2], y[:2], seed=99, **options)
    again = autoattack(model, x, y, seed=11, **options)
    assert torch.equal(first, again)
    other = autoattack(model, x, y, seed=12, **options)
    assert not torch.equal(first, other)


@needs_library
def test_one_example_alone_is_the_same_whatever_ran_before_it():
    model = small_mlp(1)
    x = torch.rand((3, *SHAPE), generator=seeded(4))
    y = predicted(model, x)
    options = {"attack": "apgd-t", "norm": "linf", "eps": 0.1, "steps": 10}
    fresh = autoattack(model, x[2:], y[2:], seed=7, **options)
    for i in range(2):
        autoattack(model, x[i : i + 1], y[i : i + 1], seed=i, **options)
    after = autoattack(model, x[2:], y[2:], seed=7, **options)
    assert torch.equal(fresh, after)


class Noisy(nn.Module):
    """A random defense drawing from torch's global RNG (as many published ones do)."""

    def __init__(self, inner: nn.Module, sigma: float = 0.05):
        super().__init__()
        self.inner, self.sigma = inner, sigma
        self.gradient_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            self.gradient_calls += 1
        return self.inner(x + self.sigma * torch.randn_like(x))


@needs_library
@pytest.mark.parametrize("attack", ["apgd-ce", "autoattack-rand"])
def test_the_callers_global_rng_state_is_unchanged(attack):
    model = Noisy(small_mlp(2))
    x = torch.rand((2, *SHAPE), generator=seeded(3))
    y = predicted(model.inner, x)
    torch.manual_seed(2024)
    state = torch.get_rng_state()
    expected_next = torch.rand(5)
    torch.set_rng_state(state)
    autoattack(model, x, y, attack=attack, norm="linf", eps=0.05, seed=1, steps=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected_next)


@needs_library
def test_rand_version_averages_each_gradient_over_20_draws_of_the_defense():
    # a point 0.5 from every boundary: not flipped at eps 0.1 whatever the noise (its
    # margin moves by N(0, 0.05) in distance units), so every iteration runs
    model, x, y, distances = multiclass_batch(0, "l2")
    far = int(torch.nonzero(distances > 0.5).flatten()[0])
    defense = Noisy(model)
    steps = 5
    x_adv = autoattack(defense, x[far : far + 1], y[far : far + 1], attack="autoattack-rand",
                       norm="l2", eps=0.1, seed=0, steps=steps)
    assert torch.equal(x_adv, x[far : far + 1])
    # the adapter's probe, then APGD-CE and APGD-DLR: EOT over 20 calls at the start and
    # at each of the steps
    assert defense.gradient_calls == 1 + 2 * 20 * (1 + steps)
    settings = autoattack_settings("autoattack-rand", steps, None)
    assert settings["eot_iter"] == 20 and settings["attacks_to_run"] == ["apgd-ce", "apgd-dlr"]


@needs_library
@pytest.mark.parametrize(("steps", "restarts"), [(None, None), (7, None), (7, 3)])
def test_steps_and_restarts_set_the_number_of_gradient_evaluations(steps, restarts):
    # APGD evaluates the gradient at its start and after each of n_iter steps, per restart
    model, x, y, _ = binary_at_distances(0, "l2", [0.9])  # never flipped at eps 0.1
    counter = CountGradients(model)
    autoattack(counter, x, y, attack="apgd-ce", norm="l2", eps=0.1, seed=0, steps=steps,
               restarts=restarts)
    n_iter, n_restarts = steps or 100, restarts or 1
    assert counter.gradient_calls == 1 + n_restarts * (1 + n_iter)


# ---------------------------------------------------------------- settings


@needs_library
def test_settings_record_the_versions_defaults():
    version = importlib.metadata.version("pyautoattack")
    assert autoattack_settings("apgd-ce", None, None) == {
        "library": "pyautoattack", "library_version": version, "version": "standard",
        "attacks_to_run": ["apgd-ce"], "n_iter": 100, "n_restarts": {"apgd-ce": 1},
        "eot_iter": 1,
    }
    assert autoattack_settings("apgd-t", None, None)["n_target_classes"] == 9
    assert autoattack_settings("autoattack", None, None) == {
        "library": "pyautoattack", "library_version": version, "version": "standard",
        "attacks_to_run": ["apgd-ce", "apgd-t", "fab-t", "square"], "n_iter": 100,
        "n_restarts": {"apgd-ce": 1, "apgd-t": 1, "fab-t": 1, "square": 1},
        "eot_iter": 1, "n_target_classes": 9, "n_queries": 5000,
    }
    assert autoattack_settings("autoattack-rand", None, None) == {
        "library": "pyautoattack", "library_version": version, "version": "rand",
        "attacks_to_run": ["apgd-ce", "apgd-dlr"], "n_iter": 100,
        "n_restarts": {"apgd-ce": 1, "apgd-dlr": 1}, "eot_iter": 20,
    }
    overridden = autoattack_settings("autoattack", 20, 3, num_classes=5)
    assert overridden["n_iter"] == 20
    # FAB-T's restarts are reset to 1 by the library before it runs; Square has one
    assert overridden["n_restarts"] == {"apgd-ce": 3, "apgd-t": 3, "fab-t": 1, "square": 1}
    assert overridden["n_target_classes"] == 4  # every class but the true one


@needs_library
def test_the_library_objects_are_set_up_as_the_settings_say():
    model = flat(linear(0, 5))
    adversary = adapter._build(model, "autoattack", "l2", 0.5, 0, 20, 3, 5, torch.device("cpu"))
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        # APGD's checkpoints (Croce & Hein 2020, Sec. 3.2): p_1 = 0.22 of the iterations,
        # intervals shrinking by 0.03 down to 0.06 of them
        assert (apgd.n_iter, apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr) == (20, 4, 1, 1)
        assert apgd.n_restarts == 3 and apgd.eps == 0.5 and apgd.norm == "L2"
    assert adversary.fab.n_iter == 20
    assert adversary.apgd_targeted.n_target_classes == adversary.fab.n_target_classes == 4
    assert adversary.verbose is False


# ---------------------------------------------------------------- refusals, output


def test_a_missing_library_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import raises ImportError
    with pytest.raises(CommandError, match=r"pip install 'robustify\[autoattack\]'") as error:
        require_autoattack()
    assert error.value.exit_code == 2
    with pytest.raises(CommandError, match="robustify"):
        autoattack(nn.Identity(), torch.zeros(1, *SHAPE), torch.zeros(1, dtype=torch.long),
                   attack="apgd-ce", norm="l2", eps=0.5, seed=0)


class NoGrad(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return x.flatten(1)[:, :10]


class DetachedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(DIMS, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1).detach())  # depends on parameters, not on x


@needs_library
@pytest.mark.parametrize(
    ("model", "x", "options", "message"),
    [
        (flat(linear(0, 2)), (1, 8, 8), {"attack": "apgd-t"}, "at least 4 classes"),
        (flat(linear(0, 2)), (1, 8, 8), {"attack": "autoattack-rand"}, "at least 3 classes"),
        (nn.Sequential(nn.Flatten(), nn.Linear(16, 10)), (1, 4, 4), {"attack": "autoattack"},
         "at least 5x5"),
        (NoGrad(), (1, 8, 8), {"attack": "apgd-ce"}, "need input gradients"),
        (DetachedInput(), (1, 8, 8), {"attack": "autoattack"}, "need input gradients"),
        (flat(linear(0, 10)), (1, 8, 8), {"attack": "fgsm"}, "unknown AutoAttack attack"),
        (flat(linear(0, 10)), (1, 8, 8), {"norm": "l1"}, "unknown norm"),
        (flat(linear(0, 10)), (1, 8, 8), {"eps": 0.0}, "eps must be a positive"),
        (flat(linear(0, 10)), (1, 8, 8), {"steps": 0}, "steps must be an integer >= 1"),
        (flat(linear(0, 10)), (1, 8, 8), {"restarts": 1.5}, "restarts must be an integer"),
        (flat(linear(0, 10)), (1, 8, 8), {"seed": -1}, "seed must be an integer"),
    ],
)
def test_bad_requests_are_refused_with_one_message(model, x, options, message):
    request = {"attack": "apgd-ce", "norm": "l2", "eps": 0.5, "seed": 0, **options}
    images = torch.rand((2, *x), generator=seeded(0))
    with pytest.raises(CommandError, match=message) as error:
        autoattack(model, images, torch.zeros(2, dtype=torch.long), **request)
    assert error.value.exit_code == 2


@needs_library
def test_nothing_is_printed_to_stdout_and_library_warnings_appear_once(capfd, caplog,
                                                                        monkeypatch):
    monkeypatch.setattr(adapter, "_seen_messages", set())
    model = Noisy(small_mlp(3))  # the standard version's check calls it "randomized"
    x = torch.rand((1, *SHAPE), generator=seeded(8))
    y = predicted(model.inner, x)
    with caplog.at_level(logging.DEBUG):
        for seed in range(2):
            autoattack(model, x, y, attack="apgd-ce", norm="linf", eps=0.01, seed=seed,
                       steps=3)
    out, err = capfd.readouterr()
    assert out == ""
    assert err.count("randomized defense") == 1
    assert not [r for r in caplog.records if r.name == "auto-attack"]
