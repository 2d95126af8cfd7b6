"""CLIPure-Cos and CLIPure-Diff (seed 000) on a tiny CLIP and a tiny diffusers prior.

Known answers come from the geometry of Eq. 8-9 (a step is a rotation in the plane of
the embedding u and the blank-prompt embedding t by atan(step)), from the Jacobians
written out by hand, and from Eq. 7 with a prior whose output is fixed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("open_clip")
pytest.importorskip("diffusers")

from classifiers.registry import build_classifier  # noqa: E402
from denoisers.purifiers import build_purifier  # noqa: E402
from denoisers.purifiers.clipure import (  # noqa: E402
    CLIPurePurifiedClassifier,
    CosineLikelihood,
    PriorLikelihood,
    PriorMismatchError,
    blank_prompts,
    load_prior,
)
from denoisers.registry import CheckpointError, CheckpointNotFoundError  # noqa: E402
from smoothing.attacks import EOT, ThreatModel, cross_entropy_loss, pgd  # noqa: E402
from tests.test_clip import TINY_ARCH  # noqa: E402
from tests.tiny_classifiers import clip_options, save_tiny_clip  # noqa: E402
from tests.tiny_models import go_offline, one_thread  # noqa: E402
from tests.tiny_purifier_models_clipure import save_tiny_prior  # noqa: E402

CLASSES = ["dog", "cat", "car"]
ALPHA_30 = math.atan(30.0)  # the rotation of one step of the paper's size


single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clipure")
    checkpoint = save_tiny_clip(folder / "clip")
    classifier = build_classifier(
        "clip-b32", class_names=CLASSES, **clip_options(checkpoint, folder / "cache")
    )
    prior = save_tiny_prior(folder / "prior")
    return {"classifier": classifier, "prior": prior, "folder": folder}


def latent(blank: torch.Tensor, gradient="exact", steps=10, step_size=30.0, normalization="sample"):
    """The latent map alone, around a given t (no image encoder)."""
    return CLIPurePurifiedClassifier(
        nn.Identity(), CosineLikelihood(blank), gradient=gradient, steps=steps,
        step_size=step_size, normalization=normalization, settings={},
    )


def plane(dim=8, seed=0):
    """A unit t and a unit v orthogonal to it, float64."""
    g = torch.Generator().manual_seed(seed)
    t = F.normalize(torch.randn(dim, generator=g, dtype=torch.float64), dim=0)
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    v = F.normalize(v - (v @ t) * t, dim=0)
    return t, v


def at_angle(t, v, degrees):
    phi = math.radians(degrees)
    return math.cos(phi) * t + math.sin(phi) * v


def angle(a, b):
    return math.degrees(math.acos(float(F.cosine_similarity(a, b, dim=-1).clamp(-1, 1))))


# -- CLIPure-Cos: geometry of Eq. 8-9 ----------------------------------------------------


def test_blank_prompts_leave_the_class_name_empty():
    prompts = blank_prompts(["a photo of a {}.", "art of the {c}"])
    assert prompts == ["a photo of a .", "art of the "]


def test_blank_embedding_is_the_unit_mean_of_the_blank_prompts(tiny):
    import open_clip

    classifier = tiny["classifier"]
    model = build_purifier("clipure-cos", classifier=classifier, blank_templates=["a {} x", "b {}"])
    tokenizer = open_clip.get_tokenizer(TINY_ARCH)
    with torch.no_grad():
        rows = F.normalize(classifier.model.encode_text(tokenizer(["a  x", "b "])), dim=-1)
    torch.testing.assert_close(model.likelihood.blank, F.normalize(rows.mean(0), dim=0))


def test_a_small_step_rotates_toward_t_by_atan_of_the_step_in_the_plane():
    t, v = plane()
    u = at_angle(t, v, 70.0)[None]
    for step in (0.05, 0.3, 2.0):
        out = latent(t, steps=1, step_size=step).purify_embeddings(u)[0]
        assert out.norm().item() == pytest.approx(1.0, abs=1e-12)
        residual = out - (out @ t) * t - (out @ v) * v  # the part outside span(t, v)
        assert residual.norm().item() < 1e-12
        assert angle(out, u[0]) == pytest.approx(math.degrees(math.atan(step)), abs=1e-9)
        assert angle(out, t) == pytest.approx(70.0 - math.degrees(math.atan(step)), abs=1e-9)


def test_norms_are_kept_for_any_magnitude():
    t, _ = plane(dim=16)
    z = torch.randn(5, 16, dtype=torch.float64) * torch.tensor([[0.5], [1], [3], [7], [20.0]])
    out = latent(t, steps=4, step_size=1.5).purify_embeddings(z)
    torch.testing.assert_close(out.norm(dim=-1), z.norm(dim=-1))


@pytest.mark.parametrize("degrees", [5.0, 40.0, 75.0, 88.0])
def test_the_papers_ten_steps_of_size_30_return_the_input_embedding(degrees):
    # One step turns u by atan(30) = 88.09 deg toward t: past t, to 88.09 - phi on the
    # other side; the next step turns it back to phi. Ten steps: where it started.
    t, v = plane()
    u = at_angle(t, v, degrees)[None]
    once = latent(t, steps=1).purify_embeddings(u)[0]
    assert angle(once, t) == pytest.approx(math.degrees(ALPHA_30) - degrees, abs=1e-9)
    assert once @ v < 0  # on the other side of t
    out = latent(t, steps=10).purify_embeddings(u)
    torch.testing.assert_close(out, u, atol=1e-12, rtol=0)
    odd = latent(t, steps=9).purify_embeddings(u)[0]
    assert angle(odd, t) == pytest.approx(math.degrees(ALPHA_30) - degrees, abs=1e-9)


def test_batch_normalization_scales_each_step_by_its_share_of_the_batch_norm():
    t, v = plane()
    phis = [30.0, 70.0]
    u = torch.stack([at_angle(t, v, p) for p in phis])
    out = latent(t, steps=1, step_size=3.0, normalization="batch").purify_embeddings(u)
    sines = [math.sin(math.radians(p)) for p in phis]
    total = math.sqrt(sum(s * s for s in sines))
    for row, phi, sine in zip(out, phis, sines, strict=True):
        turned = math.degrees(math.atan(3.0 * sine / total))
        assert angle(row, t) == pytest.approx(abs(phi - turned), abs=1e-9)  # may overshoot
    alone = latent(t, steps=1, step_size=3.0, normalization="batch").purify_embeddings(u[:1])
    assert angle(alone[0], t) == pytest.approx(math.degrees(math.atan(3.0)) - 30.0, abs=1e-9)


# -- CLIPure-Cos: what each gradient mode gives ------------------------------------------


def test_exact_mode_passes_gradcheck_in_float64():
    t, _ = plane(dim=6)
    model = latent(t, steps=3, step_size=0.7)
    z = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model.purify_embeddings, (z,))
    assert torch.autograd.gradgradcheck(model.purify_embeddings, (z,))


def test_official_jacobian_of_one_step_is_the_detached_step_written_out():
    # e' = r (u + s m) / ||u + s m|| with m held constant: at a unit u with m orthogonal
    # to it, J = u' u^T + (I - u' u'^T)(I - u u^T) / sqrt(1 + s^2).
    t, v = plane(dim=6)
    u = at_angle(t, v, 50.0)
    s = 2.5
    model = latent(t, gradient="official", steps=1, step_size=s)
    jac = torch.autograd.functional.jacobian(lambda z: model.purify_embeddings(z[None])[0], u)
    new = model.purify_embeddings(u[None])[0].detach()
    eye = torch.eye(6, dtype=torch.float64)
    expected = torch.outer(new, u) + (eye - torch.outer(new, new)) @ (
        eye - torch.outer(u, u)
    ) / math.sqrt(1 + s * s)
    torch.testing.assert_close(jac, expected, atol=1e-12, rtol=0)


def test_official_gradient_vanishes_where_the_exact_one_is_the_identity():
    # Off the (u, t) plane each official step scales by 1/sqrt(901): (1/901)^5 after ten.
    # The exact map is the identity there (and everywhere near u): its Jacobian is I.
    t, v = plane(dim=8)
    u = at_angle(t, v, 75.0)
    off_plane = torch.zeros(8, dtype=torch.float64)
    off_plane[0] = 1.0
    off_plane = off_plane - (off_plane @ t) * t - (off_plane @ v) * v
    off_plane = off_plane / off_plane.norm()

    def jvp(gradient, steps):
        model = latent(t, gradient=gradient, steps=steps)
        return torch.autograd.functional.jvp(
            lambda z: model.purify_embeddings(z[None])[0], u, off_plane
        )[1]

    torch.testing.assert_close(jvp("official", 4), off_plane / 901**2, atol=1e-15, rtol=1e-9)
    # after ten steps (1/901)^5 = 1.7e-15 is at the level of float64 rounding
    assert jvp("official", 10).norm().item() < 1e-13
    torch.testing.assert_close(jvp("exact", 10), off_plane, atol=1e-9, rtol=0)


def test_bpda_is_the_identity_backward_and_differs_from_exact(tiny):
    classifier = tiny["classifier"]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    models = {
        mode: build_purifier(
            "clipure-cos", classifier=classifier, gradient=mode, steps=3, step_size=0.5
        )
        for mode in ("exact", "official", "bpda")
    }
    outputs, grads = {}, {}
    for mode, model in models.items():
        xr = x.clone().requires_grad_(True)
        outputs[mode] = model(xr)
        (grads[mode],) = torch.autograd.grad(outputs[mode][:, 0].sum(), xr)
    torch.testing.assert_close(outputs["exact"], outputs["bpda"])
    torch.testing.assert_close(outputs["exact"], outputs["official"])
    assert not torch.allclose(grads["exact"], grads["bpda"], rtol=1e-3, atol=1e-6)
    assert not torch.allclose(grads["exact"], grads["official"], rtol=1e-3, atol=1e-6)
    # BPDA by hand: the head's gradient at the purified embedding, pulled back through
    # the encoder as if purification were the identity.
    model = models["bpda"]
    xr = x.clone().requires_grad_(True)
    z = model.image_embeddings(xr)
    with torch.no_grad():
        shift = model.purify_embeddings(z) - z
    head = model.classifier.model.logit_scale.exp() * F.normalize(z + shift, dim=-1)
    (by_hand,) = torch.autograd.grad((head @ classifier.class_embeddings.t())[:, 0].sum(), xr)
    torch.testing.assert_close(grads["bpda"], by_hand)


def test_exact_mode_of_the_whole_tiny_clip_model_passes_gradcheck(tmp_path):
    # gradcheck of x -> logits along 4 random image directions (x = x0 + A c): the
    # analytical Jacobian through encoder, inner gradients and head against finite
    # differences, without 2 x 3072 forward passes for every pixel.
    checkpoint = save_tiny_clip(tmp_path / "clip")
    classifier = build_classifier(
        "clip-b32", class_names=CLASSES, **clip_options(checkpoint, tmp_path / "cache")
    ).double()
    model = build_purifier("clipure-cos", classifier=classifier, steps=2, step_size=0.8)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64)
    basis = torch.randn(4, 3 * 32 * 32, generator=g, dtype=torch.float64) / 32
    c = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: model(x0 + (c @ basis).view_as(x0)), (c,))


def test_an_exact_pgd_attack_goes_through_the_defense(tiny):
    model = build_purifier("clipure-cos", classifier=tiny["classifier"], steps=3, step_size=0.5)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
        clean = cross_entropy_loss(model(x), y)
    threat = ThreatModel("l2", 0.5)
    x_adv = pgd(model, x, y, threat, steps=5, generator=torch.Generator().manual_seed(0))
    assert threat.distance(x_adv, x).max() <= 0.5 + 1e-5
    with torch.no_grad():
        attacked = cross_entropy_loss(model(x_adv), y)
    assert torch.all(attacked > clean)


def test_cos_outputs_logits_of_the_zero_shot_head(tiny):
    classifier = tiny["classifier"]
    model = build_purifier("clipure-cos", classifier=classifier)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(x)
        again = model(x)
    scale = classifier.model.logit_scale.exp().item()
    assert logits.shape == (3, len(CLASSES))
    assert logits.abs().max().item() <= scale * (1 + 1e-6)
    assert torch.equal(logits, again) and model.random is False
    assert model.settings == {
        "purifier": "clipure-cos", "steps": 10, "step_size": 30.0, "normalization": "sample",
        "blank_templates": "clip-imagenet-80", "gradient": "exact",
    }
    json.dumps(model.settings)  # goes into the result file's JSON
    # steps=0 is the undefended classifier
    plain = build_purifier("clipure-cos", classifier=classifier, steps=0)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), classifier(x))


def test_cos_refuses_what_it_cannot_wrap(tiny):
    with pytest.raises(ValueError, match="CLIP zero-shot classifier.*cannot wrap Linear"):
        build_purifier("clipure-cos", classifier=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown normalization 'global'"):
        build_purifier("clipure-cos", classifier=tiny["classifier"], normalization="global")
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        build_purifier("clipure-cos", classifier=tiny["classifier"], steps=-1)


# -- CLIPure-Diff: the stand-in prior ------------------------------------------------------


def build_diff(tiny, **options):
    options.setdefault("checkpoint", str(tiny["prior"]))
    options.setdefault("prior_clip_arch", TINY_ARCH)
    return build_purifier("clipure-diff", classifier=tiny["classifier"], **options)


def test_the_tiny_prior_round_trips_through_save_pretrained(tiny, tmp_path):
    from diffusers import PriorTransformer

    prior, scheduler, text_encoder, tokenizer = load_prior(tiny["prior"])
    saved = PriorTransformer.from_pretrained(tiny["prior"] / "prior")
    for name, tensor in saved.state_dict().items():
        assert torch.equal(prior.state_dict()[name], tensor), name
    assert torch.all(prior.clip_std > 0)
    assert scheduler.config.prediction_type == "sample"
    assert text_encoder.config.projection_dim == 32
    assert tokenizer("a .").input_ids[0] == 0  # <|startoftext|>
    # Kandinsky 2.1 prior's layout: scheduler/ instead of prior_scheduler/
    kandinsky = save_tiny_prior(tmp_path / "k", scheduler_folder="scheduler")
    assert load_prior(kandinsky)[1].config.num_train_timesteps == 1000


def test_diff_objective_is_eq7_for_a_prior_that_predicts_zero(tiny):
    # With f = 0 the x0-prediction loss is ||x0||^2 whatever t and the noise are, so the
    # log-likelihood is -mean(((z - clip_mean) / clip_std)^2); for an epsilon prior it is
    # -mean(eps^2), flat in z, and the purification leaves z where it is.
    model = build_diff(tiny)
    prior = model.likelihood.prior
    with torch.no_grad():
        prior.proj_to_clip_embeddings.weight.zero_()
        prior.proj_to_clip_embeddings.bias.zero_()
    z = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    value = model.likelihood(z, torch.Generator().manual_seed(0))
    expected = -((z - prior.clip_mean) / prior.clip_std).square().mean(dim=-1)
    torch.testing.assert_close(value, expected)
    model.likelihood.prediction_type = "epsilon"
    model.generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(model.purify_embeddings(z), z)


def test_diff_is_seeded_random_and_keeps_the_raw_norm(tiny):
    model = build_diff(tiny)
    assert model.random is True
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    outputs = []
    for seed in (0, 0, 1):
        model.generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            outputs.append(model(x))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])
    with torch.no_grad():
        z = model.image_embeddings(x)
        model.generator = torch.Generator().manual_seed(0)
        purified = model.purify_embeddings(z)
    torch.testing.assert_close(purified.norm(dim=-1), z.norm(dim=-1))
    assert not torch.allclose(F.normalize(purified, dim=-1), F.normalize(z, dim=-1))
    assert model.settings["prior_prediction_type"] == "sample"
    assert model.settings["timesteps"] == [900, 999]


def test_diff_exact_gradient_is_second_order_and_eot_pgd_goes_through(tiny):
    exact = build_diff(tiny, steps=2, step_size=0.5)
    official = build_diff(tiny, steps=2, step_size=0.5, gradient="official")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    grads = []
    for model in (exact, official):
        model.generator = torch.Generator().manual_seed(0)
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xr)[0, 0], xr)
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-7)
    exact.generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        y = exact(x).argmax(dim=1)
    x_adv = pgd(EOT(exact, 2), x, y, ThreatModel("linf", 8 / 255), steps=2,
                generator=torch.Generator().manual_seed(0))
    assert not torch.equal(x_adv, x)


def test_diff_refuses_a_prior_of_another_clip(tiny, tmp_path):
    with pytest.raises(PriorMismatchError, match=f"models CLIP ViT-L-14 .*is CLIP {TINY_ARCH}"):
        build_purifier("clipure-diff", classifier=tiny["classifier"], checkpoint=str(tiny["prior"]))
    narrow = save_tiny_prior(tmp_path / "narrow", embedding_dim=16)
    with pytest.raises(PriorMismatchError, match="models 16-d image embeddings.*gives 32-d"):
        build_diff(tiny, checkpoint=str(narrow))
    with pytest.raises(ValueError, match="CLIP zero-shot classifier"):
        build_purifier("clipure-diff", classifier=nn.Identity(), checkpoint=str(tiny["prior"]))


def test_diff_missing_prior_is_one_checkpoint_error(tiny, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="CLIPure-Diff prior"):
        build_diff(tiny, checkpoint=str(tmp_path / "empty"))
    go_offline(monkeypatch, tmp_path / "hub")
    with pytest.raises(CheckpointNotFoundError, match="kakaobrain/karlo-v1-alpha.*hf download"):
        build_diff(tiny, checkpoint="kakaobrain/karlo-v1-alpha")


def test_prior_likelihood_checks_its_timesteps(tiny):
    model = build_diff(tiny)
    from diffusers import UnCLIPScheduler

    scheduler = UnCLIPScheduler(prediction_type="sample")
    condition = {
        "proj_embedding": model.likelihood.proj_embedding,
        "encoder_hidden_states": model.likelihood.hidden_states,
        "attention_mask": model.likelihood.attention_mask,
    }
    with pytest.raises(ValueError, match="0 <= t_min <= t_max < 1000"):
        PriorLikelihood(model.likelihood.prior, scheduler, condition, (900, 1000))


# -- the digits-scale analogue (feature-space cosine step) --------------------------------


def test_feature_step_with_the_papers_settings_is_the_identity_on_the_digits_cnn():
    # Every test feature is within 20 deg of t (cos > 0.83), well inside atan(30) = 88 deg:
    # ten steps of 30 give the feature back, so the exact gradient is the CNN's own, while
    # in the official (detached) one the direction's part is scaled by (1/901)^5: what is
    # left is the gradient through the feature's norm r, the direction held fixed.
    from classifiers.digits import CLASS_NAMES
    from classifiers.registry import build_dataset
    from denoisers.purifiers.clipure import build_feature_cos

    cnn = build_classifier("digits-clean", class_names=CLASS_NAMES).eval()
    data = build_dataset("digits", split="test")
    x = torch.stack([data[i][0] for i in range(20)])
    exact = build_feature_cos(classifier=cnn)
    with torch.no_grad():
        features = exact.image_embeddings(x)
        cosines = F.cosine_similarity(features, exact.likelihood.blank[None], dim=-1)
        assert cosines.min() > math.cos(ALPHA_30)
        torch.testing.assert_close(exact(x), cnn(x), atol=1e-3, rtol=0)
    grads = {}
    for name, model in (("cnn", cnn), ("exact", exact),
                        ("official", build_feature_cos(classifier=cnn, gradient="official"))):
        xr = x.clone().requires_grad_(True)
        (grads[name],) = torch.autograd.grad(model(xr)[:, 3].sum(), xr)
    torch.testing.assert_close(grads["exact"], grads["cnn"], atol=1e-3, rtol=1e-3)
    xr = x.clone().requires_grad_(True)
    features = exact.image_embeddings(xr)
    with torch.no_grad():
        direction = F.normalize(exact.purify_embeddings(features), dim=-1)
    radial = cnn.head[-1](features.norm(dim=-1, keepdim=True) * direction)
    (by_hand,) = torch.autograd.grad(radial[:, 3].sum(), xr)
    torch.testing.assert_close(grads["official"], by_hand, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(grads["official"], grads["cnn"], atol=1e-2, rtol=1e-1)
    with pytest.raises(ValueError, match="digits CNN; it cannot wrap Linear"):
        build_feature_cos(classifier=nn.Linear(2, 2))
