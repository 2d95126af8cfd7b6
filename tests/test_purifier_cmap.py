"""CMAP (seed 003): one-step generation, the objective of Eq. 9-12, the vote of Eq. 14, the
gradient modes, loading and bad input, on tiny consistency models of the real classes."""

import pytest
import torch
from torch import nn

from denoisers.purifiers import build_purifier
from denoisers.purifiers.cmap import (
    BUNDLED_DIGITS_CM,
    CMAPClassifier,
    ConsistencyFunction,
    build,
    majority_vote,
)
from denoisers.registry import CheckpointError, CheckpointNotFoundError
from smoothing.attacks import ThreatModel, pgd
from tests.tiny_models import go_offline, one_thread, save_tiny_ddpm, save_to_hub_cache
from tests.tiny_purifier_models_cmap import save_tiny_cm

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

FAST = dict(num_latents=3, steps=4)


@pytest.fixture(scope="module")
def cm_dir(tmp_path_factory):
    return save_tiny_cm(tmp_path_factory.mktemp("cm") / "cm")


@pytest.fixture(scope="module")
def cm_rgb_dir(tmp_path_factory):
    return save_tiny_cm(tmp_path_factory.mktemp("cm_rgb") / "cm", channels=3)


@pytest.fixture(scope="module")
def cm_conditional_dir(tmp_path_factory):
    return save_tiny_cm(tmp_path_factory.mktemp("cm_cond") / "cm", num_class_embeds=5)


def linear_classifier(channels=1, size=8, classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, classes)).eval()


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def digits_like(batch=2, seed=1):
    return torch.rand((batch, 1, 8, 8), generator=seeded(seed))


# -- one-step generation and loading ---------------------------------------------------


def test_one_step_generation_is_the_consistency_model_pipelines(cm_rgb_dir):
    from diffusers import ConsistencyModelPipeline

    model = ConsistencyFunction.from_pretrained(cm_rgb_dir)  # saved, loaded back
    pipeline = ConsistencyModelPipeline.from_pretrained(cm_rgb_dir)
    pipeline.set_progress_bar_config(disable=True)
    z = torch.randn((2, 3, 8, 8), generator=seeded(0))
    expected = pipeline(
        batch_size=2, latents=z, num_inference_steps=1, output_type="pt"
    ).images
    torch.testing.assert_close(model.generate(z), expected, atol=1e-5, rtol=0)
    assert model.sigma_max == 80.0 and model.num_classes is None


def test_consistency_function_is_the_identity_at_sigma_min(cm_dir):
    # the boundary condition f(x, sigma_min) = x (Song et al. 2023, Eq. 5)
    model = ConsistencyFunction.from_pretrained(cm_dir)
    x = torch.randn((2, 1, 8, 8), generator=seeded(0))
    torch.testing.assert_close(model(x, torch.full((2,), model.sigma_min)), x)


def test_a_hub_id_loads_from_the_cache_offline(cm_dir, tmp_path, monkeypatch):
    save_to_hub_cache(tmp_path / "hub", "openai/diffusers-cd-tiny", cm_dir)
    go_offline(monkeypatch, tmp_path / "hub")
    purified = build(classifier=linear_classifier(), checkpoint="openai/diffusers-cd-tiny",
                     **FAST)
    local = build(classifier=linear_classifier(), checkpoint=cm_dir, **FAST)
    z = torch.randn((1, 1, 8, 8), generator=seeded(0))
    assert torch.equal(purified.purifier.model.generate(z), local.purifier.model.generate(z))


# -- the objective (Eq. 9-12) ----------------------------------------------------------


def test_restoration_loss_is_zero_for_perfect_copies_and_is_mae_plus_ssim(cm_dir):
    purifier = build(classifier=linear_classifier(), checkpoint=cm_dir, **FAST).purifier
    x = digits_like()
    copies = x[:, None].expand(2, 3, 1, 8, 8)
    torch.testing.assert_close(purifier.restoration_loss(copies, x), torch.zeros(2))
    # a constant offset c (no clipping): MAE = c, and SSIM is that of the shifted image
    shifted = (0.5 * x + 0.1)[:, None].expand(2, 3, 1, 8, 8)
    target = 0.5 * x + 0.3
    ssim = purifier.ssim(shifted[:, 0], target)
    torch.testing.assert_close(
        purifier.restoration_loss(shifted, target), 0.2 + (1.0 - ssim), atol=1e-6, rtol=0
    )


def test_distribution_loss_matches_a_hand_computed_case(cm_dir):
    purifier = build(classifier=linear_classifier(), checkpoint=cm_dir, **FAST).purifier
    # K = 2 latents of D = 2 values: z_1 = (1, 3), z_2 = (-1, 1)
    z = torch.tensor([[[1.0, 3.0], [-1.0, 1.0]]])
    # per dimension: means (0, 2), unbiased variances (2, 2): (0 + 4)/2 + (1 + 1)/2 = 3
    torch.testing.assert_close(purifier.distribution_loss(z), torch.tensor([3.0]))
    purifier.moments = "pooled"
    # pooled {1, 3, -1, 1}: mean 1, unbiased variance 8/3: 1 + (5/3)^2
    torch.testing.assert_close(purifier.distribution_loss(z), torch.tensor([1 + 25 / 9]))


def test_the_objective_falls_over_the_iterations(cm_dir):
    purifier = build(classifier=linear_classifier(), checkpoint=cm_dir, num_latents=4,
                     steps=30, lr=0.05).purifier
    history = []
    purifier.optimize(digits_like(), seeded(0), history=history)
    losses = torch.stack(history)  # [steps + 1, B]
    assert losses.shape == (31, 2)
    assert (losses[-1] < 0.9 * losses[0]).all()
    # plain gradient descent with a small step decreases it at every step
    purifier.optimizer, purifier.lr, history = "sgd", 0.05, []
    purifier.optimize(digits_like(), seeded(0), history=history)
    losses = torch.stack(history)
    assert (losses[1:] <= losses[:-1] + 1e-6).all() and (losses[-1] < losses[0]).all()


def test_the_distribution_constraint_keeps_the_latent_moments(cm_dir):
    x = digits_like()

    def moment_loss(weight):
        purifier = build(classifier=linear_classifier(), checkpoint=cm_dir, num_latents=4,
                         steps=30, lr=0.1, distribution_weight=weight).purifier
        z, _ = purifier.optimize(x, seeded(0))
        return purifier.distribution_loss(z)

    free, constrained = moment_loss(0.0), moment_loss(10.0)
    assert (constrained < free).all()


# -- output, determinism, the vote (Eq. 14) ---------------------------------------------


def test_output_shapes_and_range(cm_dir):
    purified = build(classifier=linear_classifier(classes=4), checkpoint=cm_dir, **FAST)
    purified.generator = seeded(0)
    x = digits_like(batch=3)
    images = purified.purifier.purify_all(x, seeded(0))
    assert images.shape == (3, 3, 1, 8, 8)
    assert images.min() >= 0 and images.max() <= 1
    assert purified.purify(x).shape == x.shape
    assert purified(x).shape == (3, 4)
    assert purified.random and purified.settings["gradient"] == "exact"
    assert purified.settings["num_latents"] == 3 and purified.settings["ssim_kernel_size"] == 7


def test_seeded_runs_repeat_and_other_seeds_differ(cm_dir):
    purifier = build(classifier=linear_classifier(), checkpoint=cm_dir, **FAST).purifier
    x = digits_like()
    first = purifier.purify_all(x, seeded(3))
    assert torch.equal(first, purifier.purify_all(x, seeded(3)))
    assert not torch.allclose(first, purifier.purify_all(x, seeded(4)))


def test_majority_vote_known_answers():
    # K = 3 images: classes 2, 2, 0 -> 2, although the mean logits favour 0
    logits = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [9.0, 0.0, 0.0]]])
    scores = majority_vote(logits)
    assert scores.argmax(1).item() == 2
    mean = logits.mean(1)
    torch.testing.assert_close(
        scores, torch.tensor([[1.0, 0.0, 2.0]]) + 0.5 * mean.softmax(1)
    )
    # a tie (one vote each for 0 and 1) goes to the larger mean logit: class 1
    tie = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 5.0, 0.0]]])
    assert majority_vote(tie).argmax(1).item() == 1
    # backward: that of the mean of the K logits, 1/K for each image's logit
    tie.requires_grad_(True)
    (grad,) = torch.autograd.grad(majority_vote(tie)[0, 0], tie)
    torch.testing.assert_close(grad, torch.tensor([[[0.5, 0, 0], [0.5, 0, 0]]]))


def test_the_purified_model_predicts_the_vote_of_its_images(cm_dir):
    classifier = linear_classifier(classes=4)
    purified = build(classifier=classifier, checkpoint=cm_dir, num_latents=5, steps=3)
    x = digits_like(batch=4)
    purified.generator = seeded(7)
    predicted = purified(x).argmax(1)
    images = purified.purifier.purify_all(x, seeded(7))
    labels = classifier(images.flatten(0, 1)).argmax(1).view(4, 5)
    counts = torch.stack([torch.bincount(row, minlength=4) for row in labels])
    assert (counts.gather(1, predicted[:, None]).squeeze(1) == counts.max(1).values).all()


# -- gradient modes -----------------------------------------------------------------------


def _double(purified):
    purified.purifier.model.double()
    purified.classifier.double()
    return purified


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_exact_gradient_passes_gradcheck(cm_dir, optimizer):
    purified = _double(build(classifier=linear_classifier(), checkpoint=cm_dir, num_latents=2,
                             steps=2, lr=0.05, optimizer=optimizer))
    x = digits_like(batch=1).double().mul(0.8).add(0.1).requires_grad_(True)

    def images(inputs):
        return purified.purifier.purify_all(inputs, seeded(0))

    assert torch.autograd.gradcheck(images, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def _input_gradient(purified, x, seed=0):
    x = x.clone().requires_grad_(True)
    purified.generator = seeded(seed)
    (grad,) = torch.autograd.grad(purified(x)[:, 0].sum(), x)
    return grad


def test_official_is_exact_for_one_step_and_truncated_for_more(cm_dir):
    x = digits_like(batch=1)
    grads = {}
    for steps in (1, 3):
        for gradient in ("exact", "official"):
            purified = build(classifier=linear_classifier(), checkpoint=cm_dir, gradient=gradient,
                             num_latents=2, steps=steps)
            grads[gradient, steps] = _input_gradient(purified, x)
    torch.testing.assert_close(grads["exact", 1], grads["official", 1])
    assert grads["official", 3].abs().sum() > 0
    assert not torch.allclose(grads["exact", 3], grads["official", 3])


def test_bpda_gradient_is_the_classifiers_at_the_purified_images(cm_dir):
    classifier = linear_classifier()
    bpda = build(classifier=classifier, checkpoint=cm_dir, gradient="bpda", **FAST)
    exact = build(classifier=classifier, checkpoint=cm_dir, gradient="exact", **FAST)
    x = digits_like(batch=1)
    grad_bpda = _input_gradient(bpda, x)
    # a linear classifier: the mean logit's gradient at each image is w_0, whatever the
    # image; the vote's backward is the mean over K = 3, and the identity sums the K copies
    weight = classifier[1].weight[0].view(1, 1, 8, 8)
    torch.testing.assert_close(grad_bpda, weight, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(grad_bpda, _input_gradient(exact, x))
    bpda.generator, exact.generator = seeded(0), seeded(0)
    assert torch.equal(bpda(x), exact(x))  # same forward pass


def test_an_exact_gradient_pgd_attack_goes_through_the_defense(cm_dir):
    purified = build(classifier=linear_classifier(classes=4), checkpoint=cm_dir, **FAST)
    x, y = digits_like(batch=2), torch.tensor([0, 1])
    grad = _input_gradient(purified, x)
    assert grad.abs().sum() > 0
    threat = ThreatModel("linf", 0.1)
    purified.generator = seeded(0)
    x_adv = pgd(purified, x, y, threat, steps=2, random_start=False)
    assert not torch.equal(x_adv, x)
    assert (threat.distance(x_adv, x) <= 0.1 + 1e-6).all()


# -- class-conditional models --------------------------------------------------------------


def test_label_policies_of_a_class_conditional_model(cm_conditional_dir):
    x = digits_like()
    fixed = build(classifier=linear_classifier(classes=5), checkpoint=cm_conditional_dir,
                  label_policy="fixed", label=3, **FAST).purifier
    assert torch.equal(fixed.class_labels(x, seeded(0), None), torch.full((2, 3), 3))
    random = build(classifier=linear_classifier(classes=5), checkpoint=cm_conditional_dir,
                   **FAST).purifier
    drawn = random.class_labels(x, seeded(0), None)
    assert drawn.shape == (2, 3) and drawn.min() >= 0 and drawn.max() < 5
    assert torch.equal(drawn, random.class_labels(x, seeded(0), None))
    # the label reaches the UNet: another label, another image from the same latent
    z = torch.randn((1, 1, 8, 8), generator=seeded(0))
    model = fixed.model
    assert not torch.allclose(model.generate(z, torch.tensor([0])),
                              model.generate(z, torch.tensor([4])))
    classifier = linear_classifier(classes=5)
    predicted = build(classifier=classifier, checkpoint=cm_conditional_dir,
                      label_policy="predicted", **FAST)
    labels = predicted.purifier.class_labels(x, seeded(0), classifier(x).argmax(1))
    assert torch.equal(labels, classifier(x).argmax(1)[:, None].expand(2, 3))
    predicted.generator = seeded(0)
    assert predicted(x).shape == (2, 5)


# -- registry, resize, bad input -----------------------------------------------------------


def test_the_registry_builds_it(cm_dir):
    purified = build_purifier("cmap", classifier=linear_classifier(), gradient="official",
                              checkpoint=cm_dir, **FAST)
    assert isinstance(purified, CMAPClassifier)
    assert purified.settings["gradient"] == "official"
    assert purified.settings["checkpoint"] == str(cm_dir)


def test_resize_fits_other_sizes_to_the_model(cm_dir):
    x = torch.rand((1, 1, 16, 16), generator=seeded(0))
    purified = build(classifier=linear_classifier(size=16), checkpoint=cm_dir, **FAST)
    with pytest.raises(ValueError, match="generates 8x8 images, the input is 16x16"):
        purified(x)
    resized = build(classifier=linear_classifier(size=16), checkpoint=cm_dir, resize=True,
                    **FAST)
    resized.generator = seeded(0)
    assert resized.purify(x).shape == x.shape and resized(x).shape == (1, 4)


def test_bad_input_gives_one_clear_error(cm_dir, tmp_path):
    with pytest.raises(ValueError, match="torch.nn.Module classifier"):
        build(classifier=lambda x: x, checkpoint=cm_dir)
    with pytest.raises(CheckpointNotFoundError, match="consistency model"):
        build(classifier=linear_classifier(), checkpoint=tmp_path / "missing")
    ddpm = save_tiny_ddpm(tmp_path / "ddpm", sample_size=8)
    with pytest.raises(CheckpointError, match="not a CMStochasticIterativeScheduler"):
        build(classifier=linear_classifier(), checkpoint=ddpm)
    for options, message in (
        (dict(label_policy="bogus"), "unknown label_policy"),
        (dict(moments="bogus"), "unknown moments"),
        (dict(num_latents=1), "num_latents >= 2"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(lr=-1.0), "lr must be a positive"),
        (dict(label=2), "unconditional"),
        (dict(gradient="blind"), "unknown gradient mode"),
    ):
        with pytest.raises(ValueError, match=message):
            build(classifier=linear_classifier(), checkpoint=cm_dir, **options)
    purified = build(classifier=linear_classifier(), checkpoint=cm_dir, **FAST)
    with pytest.raises(ValueError, match=r"expected a batch \[B, 1, H, W\]"):
        purified(torch.rand(1, 3, 8, 8))


def test_a_conditional_model_checks_its_labels(cm_conditional_dir):
    with pytest.raises(ValueError, match="needs a label in 0..4"):
        build(classifier=linear_classifier(classes=5), checkpoint=cm_conditional_dir,
              label_policy="fixed", label=5)
    purified = build(classifier=linear_classifier(classes=9), checkpoint=cm_conditional_dir,
                     label_policy="predicted", **FAST)
    with pytest.raises(ValueError, match="outside the consistency model's 0..4"):
        purified.purifier.class_labels(digits_like(), seeded(0), torch.tensor([8, 1]))


# -- the bundled digits model ---------------------------------------------------------------


@pytest.mark.skipif(not (BUNDLED_DIGITS_CM / "unet").is_dir(), reason="no bundled digits CM")
def test_the_bundled_digits_model_is_the_default(cm_dir):
    from classifiers import build_classifier
    from classifiers.digits import CLASS_NAMES

    classifier = build_classifier("digits-clean", class_names=CLASS_NAMES).eval()
    purified = build(classifier=classifier, **FAST)
    assert purified.settings["checkpoint"] == str(BUNDLED_DIGITS_CM)
    purified.generator = seeded(0)
    assert purified(digits_like()).shape == (2, 10)


def test_an_unknown_option_is_refused_by_name_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="CMAP has no option num_latent$"):
        build_purifier("cmap", classifier=nn.Identity(), checkpoint=tmp_path / "absent",
                       num_latent=4)
