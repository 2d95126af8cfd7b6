"""The purifiers' shared shape: registry names, gradient modes, PurifiedClassifier."""

import pytest
import torch
from torch import nn

from denoisers.purifiers import PURIFIERS, PurifiedClassifier, build_purifier


class Squash(nn.Module):
    """A differentiable toy purifier: x -> x^2 (so its Jacobian is 2x, not the identity)."""

    random = False

    def purify(self, x, generator):
        return x * x


def test_the_five_purifiers_are_registered():
    assert PURIFIERS.names() == ["clipure-cos", "clipure-diff", "cmap", "lgap", "zeropur"]


def test_unknown_gradient_mode_is_refused_before_building():
    with pytest.raises(ValueError, match="unknown gradient mode 'bogus'"):
        build_purifier("zeropur", classifier=nn.Identity(), gradient="bogus")


def test_exact_gradient_goes_through_the_purifier_and_bpda_skips_it():
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 1, 2, 2, requires_grad=True)
    exact = PurifiedClassifier(Squash(), classifier, gradient="exact")
    bpda = PurifiedClassifier(Squash(), classifier, gradient="bpda")
    assert torch.equal(exact(x), bpda(x))  # same forward pass
    weight = classifier[1].weight[0].view(1, 1, 2, 2)
    (grad_exact,) = torch.autograd.grad(exact(x)[:, 0].sum(), x)
    (grad_bpda,) = torch.autograd.grad(bpda(x)[:, 0].sum(), x)
    # d/dx w.(x^2) = 2 x w exactly; BPDA treats x -> x^2 as the identity: w
    torch.testing.assert_close(grad_exact, 2 * x.detach() * weight)
    torch.testing.assert_close(grad_bpda, weight.expand_as(x))
    assert exact.settings == {"gradient": "exact"} and bpda.classifier is classifier
