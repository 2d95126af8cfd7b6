"""ZeroPur (seed 002): shape, range, ball, determinism, the equations' known answers, gradients.

The digits CNNs are the shipped ones, loaded from their safetensors files through the
classifier registry (the path a user takes); ZeroPur has no weights of its own.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from classifiers.digits import CLASS_NAMES, load_digits_split
from classifiers.registry import CLASSIFIERS
from denoisers.purifiers import build_purifier
from denoisers.purifiers.zeropur import (
    DIGITS_DEFAULTS,
    _perceptual_features,
    build,
    median_blur,
)
from smoothing.attacks import ThreatModel, pgd
from tests.tiny_models import one_thread as _one_thread

one_thread = pytest.fixture(scope="module", autouse=True)(_one_thread)

EPS = 10 / 255


@pytest.fixture(scope="module")
def digits_clean():
    return CLASSIFIERS.build("digits-clean", class_names=CLASS_NAMES)


@pytest.fixture(scope="module")
def digits():
    split = load_digits_split("test")
    return split.images[:6], split.labels[:6]


def quick(classifier, gradient="exact", **options):
    """Fewer steps than the defaults, for speed; the algorithm is the same."""
    return build(classifier, gradient, gs_steps=3, ap_steps=5, **options)


# --- shape, range, ball, determinism -------------------------------------------------


@pytest.mark.parametrize("gradient", ["exact", "official", "bpda"])
def test_output_has_the_input_shape_lies_in_0_1_and_in_the_eps_ball(digits_clean, digits, gradient):
    x, _ = digits
    model = quick(digits_clean, gradient, random_start=True)
    model.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        purified = model.purify(x)
        guided = model.purifier.guided_shift(x, torch.Generator().manual_seed(0))
        logits = model(x)
    for out in (purified, guided):
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        assert (out - x).abs().max() <= EPS + 1e-7
    assert (purified - x).abs().max() > EPS / 2  # it does move (not a no-op)
    assert logits.shape == (6, 10)


def test_the_default_run_also_stays_in_its_ball(digits_clean, digits):
    x, _ = digits
    model = build_purifier("zeropur", classifier=digits_clean, gradient="bpda", eps=0.05)
    with torch.no_grad():
        purified = model.purify(x)
    assert purified.min() >= 0 and purified.max() <= 1
    assert (purified - x).abs().max() <= 0.05 + 1e-7


def test_every_gradient_mode_has_the_same_forward(digits_clean, digits):
    x, _ = digits
    outputs = []
    for gradient in ("exact", "official", "bpda"):
        model = quick(digits_clean, gradient)
        outputs.append(model.purify(x.clone().requires_grad_(True)).detach())
        with torch.no_grad():
            outputs.append(model.purify(x))
    assert all(torch.equal(out, outputs[0]) for out in outputs)


def test_seeded_determinism(digits_clean, digits):
    x, _ = digits
    model = quick(digits_clean, "bpda", random_start=True)
    assert model.random
    runs = [model.purifier.purify(x, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    plain = quick(digits_clean, "bpda")  # the authors' default: no random start
    assert not plain.random
    assert torch.equal(plain.purify(x), plain.purify(x))


# --- known answers of the equations --------------------------------------------------


class ConstantFeatures(nn.Module):
    """A classifier whose hooked layers ignore the input (zero weights, random biases)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(64, 5)
        self.feature = nn.Conv2d(1, 3, 3, padding=1)
        nn.init.zeros_(self.embed.weight)
        nn.init.zeros_(self.feature.weight)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        flat = x.flatten(1)
        return self.head(flat) + self.embed(flat).sum() * 0 + self.feature(x).sum() * 0


@pytest.mark.parametrize("gradient", ["exact", "official", "bpda"])
def test_a_flat_objective_leaves_x_unchanged(gradient):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = build(ConstantFeatures(), gradient, embedding_layer="embed",
                  feature_layers=["feature"], gs_steps=4, ap_steps=6, blur="gaussian")
    assert torch.equal(model.purifier.guided_shift(x), x)
    with torch.no_grad():
        assert torch.equal(model.purify(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_image_equal_to_its_blurred_copy_is_left_unchanged(digits_clean, dtype):
    # both are fixed points of the 3x3 median: a constant image and a vertical edge
    edge = torch.zeros(1, 1, 8, 8, dtype=dtype)
    edge[..., 4:] = 1
    images = torch.cat([torch.full((1, 1, 8, 8), 0.3, dtype=dtype), edge])
    assert torch.equal(median_blur(images), images)
    classifier = CLASSIFIERS.build("digits-clean", class_names=CLASS_NAMES).to(dtype)
    model = build(classifier, "bpda")  # digits defaults: median blur
    assert model.settings["blur"] == "median"
    with torch.no_grad():
        assert torch.equal(model.purify(images), images)


class LinearToy(nn.Module):
    """f(x) = flatten(x) (an Identity layer named "embed"), then a linear head."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.embed = nn.Identity()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.embed(self.flat(x)))


def test_each_guided_shift_step_raises_the_alignment_as_computed_by_hand():
    # x = [[a, b], [a, b]], f = identity, blur = 3-tap Gaussian with reflect padding:
    # rows of (a, b) become (p a + q b, q a + p b), p = w0, q = 2 w1 (weights w0 at the
    # centre, w1 beside it), columns are unchanged. For a > b > 0 the gradient of
    # cos(z, blurred) is q b (b^2 - a^2) < 0 at a and q a (a^2 - b^2) > 0 at b (times a
    # positive factor), so each signed step moves a down and b up by eta.
    sigma, eta, a, b = 0.33, 0.02, 0.7, 0.3
    w1 = math.exp(-0.5 / sigma**2)
    p, q = 1 / (1 + 2 * w1), 2 * w1 / (1 + 2 * w1)

    def alignment_by_hand(a, b):
        blurred = (p * a + q * b, q * a + p * b)
        return (a * blurred[0] + b * blurred[1]) / math.hypot(a, b) / math.hypot(*blurred)

    toy = LinearToy().double()
    x = torch.tensor([[[[a, b], [a, b]]]], dtype=torch.float64)
    alignments = []
    for steps in range(1, 6):
        model = build(toy, "bpda", embedding_layer="embed", feature_layers=["embed"],
                      blur="gaussian", gaussian_sigma=sigma, eps=0.2, gs_steps=steps,
                      gs_step_size=eta)
        guided = model.purifier.guided_shift(x)
        a_k, b_k = a - steps * eta, b + steps * eta
        expected = torch.tensor([[[[a_k, b_k], [a_k, b_k]]]], dtype=torch.float64)
        torch.testing.assert_close(guided, expected, rtol=0, atol=1e-15)
        alignment = model.purifier.alignment(guided).item()
        assert alignment == pytest.approx(alignment_by_hand(a_k, b_k), abs=1e-12)
        alignments.append(alignment)
    start = model.purifier.alignment(x).item()
    assert start == pytest.approx(alignment_by_hand(a, b), abs=1e-12)
    values = [start, *alignments]
    assert all(later > earlier for earlier, later in zip(values, values[1:], strict=False))


def test_median_blur_is_the_median_of_each_reflect_padded_window():
    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    expected = np.empty_like(x.numpy())
    for i in range(5):
        for j in range(6):
            expected[:, :, i, j] = np.median(padded[:, :, i : i + 3, j : j + 3], axis=(2, 3))
    torch.testing.assert_close(median_blur(x), torch.from_numpy(expected), rtol=0, atol=0)


def test_perceptual_features_have_unit_norm_per_layer():
    # each location's channel vector has norm 1 / sqrt(h w), so each layer's part of phi
    # has norm 1 and ||phi||^2 is the number of layers (Eq. 20)
    features = [torch.randn(2, 4, 3, 5), torch.randn(2, 7, 2, 2), torch.randn(2, 6)]
    phi = _perceptual_features(features)
    assert phi.shape == (2, 4 * 15 + 7 * 4 + 6)
    torch.testing.assert_close(phi.pow(2).sum(dim=1), torch.full((2,), 3.0))


def test_adaptive_projection_step_follows_the_projection_direction_for_a_linear_toy():
    # with f_l = identity and lambda2 = 0, L = -lambda1 (x_g - x) . (x_p - x): its
    # gradient is -lambda1 (x_g - x), so the first step moves x_p by eta_2 sgn(x_g - x)
    toy = LinearToy().double()
    x = torch.tensor([[[[0.5, 0.5], [0.2, 0.8]]]], dtype=torch.float64)
    x_g = x + torch.tensor([[[[0.01, -0.02], [0.0, 0.03]]]], dtype=torch.float64)
    model = build(toy, "bpda", embedding_layer="embed", feature_layers=["embed"],
                  lambda2=0.0, ap_steps=4, eps=0.1)
    projected = model.purifier.adaptive_projection(x, x_g)
    # 4 steps of 0.1 / 4 along the sign: to the ball's face where x_g moved, 0 elsewhere
    torch.testing.assert_close(projected, x + 0.1 * (x_g - x).sign(), rtol=0, atol=1e-15)


# --- gradients -----------------------------------------------------------------------


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.act1 = nn.Tanh()
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.act2 = nn.Tanh()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(self.pool(h).flatten(1))


def tiny_exact():
    return build(TinyCNN().double(), "exact", embedding_layer="pool",
                 feature_layers=["act1", "act2"], blur="gaussian", gaussian_sigma=0.8,
                 eps=0.05, gs_steps=3, ap_steps=4, lambda1=1.0)


def gradcheck_input():
    # a third of the pixels near 0, a third near 1, the rest inside: near the box, the
    # purifier's steps toward it get pinned (derivative 0)
    u = torch.rand(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return torch.where(u < 0.3, 0.012, torch.where(u > 0.7, 0.988, 0.2 + 0.6 * u)).double()


def test_exact_mode_passes_gradcheck_where_the_signs_are_locally_constant():
    model = tiny_exact()
    x = gradcheck_input().requires_grad_(True)
    assert torch.autograd.gradcheck(model.purify, (x,), eps=1e-7, atol=1e-6)


def test_exact_jacobian_is_the_identity_with_box_pinned_pixels_masked():
    # sgn() has zero derivative, so only the iterates and the clips carry derivatives
    # (module docstring): a diagonal 0/1 Jacobian, 1 wherever the box cannot act
    model = tiny_exact()
    x = gradcheck_input()
    jacobian = torch.autograd.functional.jacobian(model.purify, x).reshape(16, 16)
    diagonal = jacobian.diagonal()
    assert torch.equal(jacobian, torch.diag(diagonal))
    assert set(diagonal.tolist()) <= {0.0, 1.0}
    step = 0.05 / 4
    interior = ((x > 0.05 + step) & (x < 1 - 0.05 - step)).flatten()
    assert torch.equal(diagonal[interior], torch.ones(int(interior.sum()), dtype=x.dtype))
    assert (diagonal == 0).any()  # this input has pixels the box pins: exact is not BPDA


def test_exact_differs_from_bpda_only_on_pinned_pixels_and_official_equals_bpda(
    digits_clean, digits
):
    x, y = digits

    def loss_gradient(gradient):
        model = quick(digits_clean, gradient)
        x_in = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x_in), y)
        return torch.autograd.grad(loss, x_in)[0]

    exact, official, bpda = (loss_gradient(g) for g in ("exact", "official", "bpda"))
    assert torch.isfinite(exact).all() and exact.abs().sum() > 0
    assert torch.equal(official, bpda)  # the authors' code: the identity backward
    # exact = the BPDA gradient times a factor in [0, 1] per pixel: 1 where no clip
    # acts, 0 where the box pinned it (digits have a black background, which the
    # purifier pushes against 0); an iterate exactly on a bound is a kink, where autograd
    # splits a tie of clamp in halves (a subgradient)
    factor = torch.where(bpda != 0, exact / bpda, 0.0)
    assert torch.all((bpda != 0) | (exact == 0))
    assert factor.min() >= 0 and factor.max() <= 1 + 1e-6
    assert (exact == bpda).float().mean() > 0.5 and (exact == 0).float().mean() > 0.05
    assert not torch.equal(exact, bpda)


def test_an_exact_gradient_pgd_attack_goes_through_the_defense(digits_clean, digits):
    x, y = digits
    threat = ThreatModel("l2", 0.5)
    seen = []

    def record(step, x_adv):
        seen.append(x_adv)

    model = quick(digits_clean, "exact")
    x_adv = pgd(model, x, y, threat, steps=3, generator=torch.Generator().manual_seed(0),
                callback=record)
    assert (threat.distance(x_adv, x) <= 0.5 + 1e-5).all()
    assert not torch.equal(seen[1], seen[0])  # a non-zero gradient moved it
    bpda = quick(digits_clean, "bpda")
    x_bpda = pgd(bpda, x, y, threat, steps=3, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(x_adv, x_bpda)


# --- layers, defaults, settings ------------------------------------------------------


def test_digits_defaults_and_settings(digits_clean):
    model = build_purifier("zeropur", classifier=digits_clean, gradient="exact")
    assert model.settings["embedding_layer"] == DIGITS_DEFAULTS["embedding_layer"]
    assert model.settings["feature_layers"] == list(DIGITS_DEFAULTS["feature_layers"])
    assert model.settings["lambda1"] == 1.0 and model.settings["blur"] == "median"
    assert model.settings["eps"] == EPS and model.settings["gradient"] == "exact"
    assert model.settings["gs_step_size"] == EPS / 10 and model.settings["ap_steps"] == 50
    noise_trained = CLASSIFIERS.build("digits-sigma0.25", class_names=CLASS_NAMES)
    other = build(noise_trained, "bpda")
    assert other.settings["blur"] == "gaussian" and other.settings["gaussian_sigma"] == 1.2
    assert model.classifier is digits_clean


def test_torchvision_resnet_layers_by_name():
    classifier = CLASSIFIERS.build("resnet18", class_names=[str(i) for i in range(1000)],
                                   pretrained=None).eval()
    model = build(classifier, "bpda", embedding_layer="model.avgpool",
                  feature_layers=["model.layer3", "model.layer4"],
                  perceptual_layers=["model.layer1", "model.layer2", "model.layer3",
                                     "model.layer4"], gs_steps=2, ap_steps=2)
    assert model.settings["lambda1"] == 1e-4 and model.settings["blur"] == "gaussian"
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        purified = model.purify(x)
    assert (purified - x).abs().max() <= EPS + 1e-7 and not torch.equal(purified, x)
    shared = build(classifier, "bpda", embedding_layer="model.layer1.0.relu",
                   feature_layers=["model.layer4"], gs_steps=1, ap_steps=1)
    with pytest.raises(ValueError, match="runs more than once"):
        shared.purify(x)


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"embedding_layer": "head.7"}, "no module named 'head.7'.*'features.1'"),
        ({"feature_layers": ["features.1", "nope"]}, "no module named 'nope'"),
        ({"feature_layers": []}, "feature_layers must be one or more module names"),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"eps": float("nan")}, "eps must be a finite number"),
        ({"gs_steps": 0}, "gs_steps must be an integer >= 1"),
        ({"ap_steps": -1}, "ap_steps must be an integer >= 0"),
        ({"ap_steps": 2.5}, "ap_steps must be an integer"),
        ({"lambda1": -1.0}, "lambda1 must be >= 0"),
        ({"blur": "box"}, "unknown blur 'box'; use one of median, gaussian"),
        ({"median_size": 4}, "median_size must be odd"),
        ({"gaussian_sigma": 0}, "gaussian_sigma must be > 0"),
        ({"random_start": "yes"}, "random_start must be True or False"),
    ],
)
def test_bad_options_are_refused_with_one_message(digits_clean, options, message):
    with pytest.raises(ValueError, match=message):
        build_purifier("zeropur", classifier=digits_clean, **options)


def test_a_classifier_it_cannot_wrap_is_refused():
    with pytest.raises(ValueError, match="wraps a torch.nn.Module classifier, got str"):
        build_purifier("zeropur", classifier="digits-clean")
    with pytest.raises(ValueError, match="needs embedding_layer and feature_layers.*'embed'"):
        build_purifier("zeropur", classifier=LinearToy())


def test_bad_images_are_refused(digits_clean):
    too_wide = quick(digits_clean, "bpda", blur="gaussian", gaussian_sigma=3.0)
    with pytest.raises(ValueError, match="kernel 19.* does not fit a 8x8 image"):
        too_wide.purify(torch.zeros(1, 1, 8, 8))
    model = quick(digits_clean, "bpda")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.purify(torch.full((1, 1, 8, 8), 1.5))
    with pytest.raises(ValueError, match=r"float batch \[B, C, H, W\]"):
        model.purify(torch.zeros(1, 8, 8))
