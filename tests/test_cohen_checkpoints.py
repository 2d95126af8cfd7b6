"""--model cohen:PATH: checkpoints saved the way Cohen et al.'s and Salman et al.'s train.py do.

Their code (locuslab/smoothing, code/train.py, architectures.py, datasets.py) saves
`{"epoch", "arch", "state_dict", "optimizer"}` of `Sequential(NormalizeLayer, net)`,
the ResNet-50 inside `DataParallel`. The tests rebuild that layout with their
normalization constants (typed here from their datasets.py) and check logits.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
import torchvision

from classifiers import build_classifier
from classifiers.cohen import CifarResNet
from cli.main import certify_command
from tests.cli_helpers import invoke, rows, sidecar
from tests.test_cli import registered_dataset
from tests.tiny_models import one_thread

CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


class TheirNormalizeLayer(torch.nn.Module):
    """As in their datasets.py: constants as plain tensors, so no state-dict keys."""

    def __init__(self, means, sds):
        super().__init__()
        self.means, self.sds = torch.tensor(means), torch.tensor(sds)

    def forward(self, x):
        return (x - self.means.view(1, -1, 1, 1)) / self.sds.view(1, -1, 1, 1)


def randomize_batch_norm(network: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)


def save_like_their_train_py(network, arch, mean, std, path, data_parallel: bool, size=32):
    inner = torch.nn.DataParallel(network) if data_parallel else network
    model = torch.nn.Sequential(TheirNormalizeLayer(mean, std), inner)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    model(torch.rand(2, 3, size, size)).sum().backward()
    optimizer.step()  # momentum buffers in the optimizer state, as in a real checkpoint
    model.eval()
    torch.save({"epoch": 90, "arch": arch, "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict()}, path)
    return model


def test_cifar_resnet_has_their_key_layout_and_he_et_al_size():
    # keys of their archs/cifar_resnet.py for depth 6n + 2, listed from that file
    def bn(prefix):
        return [f"{prefix}.{k}" for k in
                ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    expected = ["conv1.weight", *bn("bn1")]
    for stage in (1, 2, 3):
        for block in range(3):
            prefix = f"layer{stage}.{block}"
            expected += [f"{prefix}.conv1.weight", *bn(f"{prefix}.bn1"),
                         f"{prefix}.conv2.weight", *bn(f"{prefix}.bn2")]
            if stage > 1 and block == 0:
                expected += [f"{prefix}.downsample.0.weight", *bn(f"{prefix}.downsample.1")]
    expected += ["fc.weight", "fc.bias"]
    assert sorted(CifarResNet(20).state_dict()) == sorted(expected)
    assert CifarResNet(20).state_dict()["layer3.0.downsample.0.weight"].shape == (64, 32, 1, 1)
    # He et al. (2016), Table 6: ResNet-110 has 1.7M parameters
    assert sum(p.numel() for p in CifarResNet(110).parameters()) == pytest.approx(1.7e6, rel=0.02)


def test_cifar_checkpoint_loads_with_its_normalization(tmp_path):
    torch.manual_seed(0)
    network = CifarResNet(20)
    randomize_batch_norm(network)
    path = tmp_path / "checkpoint.pth.tar"
    theirs = save_like_their_train_py(network, "cifar_resnet20", CIFAR10_MEAN, CIFAR10_STD, path,
                                      data_parallel=False)
    ours = build_classifier(f"cohen:{path}", class_names=[str(i) for i in range(10)])
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(x)
        assert torch.allclose(ours(x), expected, atol=1e-5)
        # a model normalized with other constants would not agree
        assert not torch.allclose(ours(x), theirs[1](x), atol=1e-3)


def test_imagenet_resnet50_checkpoint_with_data_parallel_prefixes(tmp_path):
    torch.manual_seed(0)
    network = torchvision.models.resnet50(weights=None)
    randomize_batch_norm(network)
    path = tmp_path / "checkpoint.pth.tar"
    theirs = save_like_their_train_py(network, "resnet50", IMAGENET_MEAN, IMAGENET_STD, path,
                                      data_parallel=True, size=64)
    keys = torch.load(path, weights_only=True)["state_dict"]
    assert "1.module.conv1.weight" in keys  # the layout their DataParallel model saves
    ours = build_classifier(f"cohen:{path}", class_names=[str(i) for i in range(1000)])
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-4)


class TinyCifar(torch.utils.data.Dataset):
    classes = tuple(str(i) for i in range(10))

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(index)), index % 10


def constant_checkpoint(path, label: int, arch: str = "cifar_resnet20"):
    """A CIFAR ResNet whose head ignores the features and always votes for `label`."""
    network = CifarResNet(20)
    with torch.no_grad():
        network.fc.weight.zero_()
        network.fc.bias.zero_()
        network.fc.bias[label] = 1.0
    save_like_their_train_py(network, arch, CIFAR10_MEAN, CIFAR10_STD, path, data_parallel=False)


FAST = ["--dataset", "tinycifar", "--n0", "10", "--n", "100", "--batch", "50", "--quiet",
        "--device", "cpu"]


def test_certify_with_a_cohen_checkpoint(tmp_path):
    path = tmp_path / "noise_0.25.pth.tar"
    constant_checkpoint(path, label=7)
    out = tmp_path / "run"
    with registered_dataset("tinycifar", lambda split, data_root: TinyCifar()):
        result = invoke(certify_command, *FAST, "--model", f"cohen:{path}", "--out", str(out),
                        catch_exceptions=True)
    assert result.exit_code == 0, result.output
    # every vote for class 7: radius sigma * Phi^-1(alpha^(1/n)), rounded down
    radius = math.floor(0.25 * NormalDist().inv_cdf(0.001 ** (1 / 100)) * 1e6) / 1e6
    assert [(int(r["predict"]), float(r["radius"])) for r in rows(out)] == [(7, radius)] * 4
    settings = sidecar(out)["settings"]
    assert settings["model_source"]["checkpoint"] == str(path)
    assert len(settings["model_source"]["checkpoint_sha256"]) == 64


def _not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    return path


def _plain_state_dict(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(CifarResNet(20).state_dict(), path)
    return path


def _pickled_module(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(CifarResNet(20), path)  # a pickled object: weights_only=True refuses it
    return path


def _unknown_arch(tmp_path):
    path = tmp_path / "wrn.pth.tar"
    constant_checkpoint(path, 0, arch="cifar_wrn28")
    return path


def _imagenet_arch_for_ten_classes(tmp_path):
    path = tmp_path / "imagenet32.pth.tar"
    constant_checkpoint(path, 0, arch="imagenet32_resnet110")
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: tmp / "missing.pth.tar", "no such file"),
    (_not_a_checkpoint, "cannot be read with torch.load(weights_only=True)"),
    (_plain_state_dict, "not a checkpoint of Cohen et al.'s format"),
    (_pickled_module, "cannot be read with torch.load(weights_only=True)"),
    (_unknown_arch, "has arch 'cifar_wrn28'; known: resnet50"),
    (_imagenet_arch_for_ten_classes, "predicts 1000 classes, but the dataset has 10"),
])
def test_bad_checkpoints_are_one_clear_error_and_write_nothing(tmp_path, make, message):
    path = make(tmp_path)
    out = tmp_path / "out" / "run"
    with registered_dataset("tinycifar", lambda split, data_root: TinyCifar()):
        result = invoke(certify_command, *FAST, "--model", f"cohen:{path}", "--out", str(out),
                        catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()
