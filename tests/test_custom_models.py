"""--model path/to/file.py:factory and package.module:factory; --threads; Cohen's --N / --N0."""

from __future__ import annotations

import hashlib
import math
from statistics import NormalDist

import pytest
import torch

from cli.main import certify_command
from tests.cli_helpers import invoke, rows, sidecar

FAST = ["--n0", "20", "--n", "200", "--batch", "100", "--max", "4", "--quiet"]
SIGMA = 0.25
# Known answer: a classifier voting for one class on every draw gets the Clopper-Pearson
# lower bound alpha^(1/n), hence radius sigma * Phi^-1(alpha^(1/n)), written rounded down.
ALL_VOTES_RADIUS = math.floor(SIGMA * NormalDist().inv_cdf(0.001 ** (1 / 200)) * 1e6) / 1e6
DIGITS_LABELS = [2, 0, 4, 9]  # the first four digits test examples

CONSTANT_MODEL = '''
import torch


class Constant(torch.nn.Module):
    """Logits that always pick class `label`, whatever the image."""

    def __init__(self, num_classes: int, label: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.num_classes, self.label = num_classes, label

    def forward(self, images):
        logits = torch.zeros(images.shape[0], self.num_classes)
        logits[:, self.label] = self.scale
        return logits


def build(num_classes):
    return Constant(num_classes, 3)


def build_wide():
    return Constant(11, 3)


def not_a_module():
    return "a string"


def broken():
    raise RuntimeError("no weights here")


NOT_CALLABLE = 3
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(CONSTANT_MODEL)
    return path


def test_file_factory_is_certified_and_recorded_with_its_hash(tmp_path, model_file):
    out = tmp_path / "run"
    result = invoke(certify_command, *FAST, "--model", f"{model_file}:build", "--out", str(out))
    assert result.exit_code == 0, result.output
    table = rows(out)
    assert [int(r["predict"]) for r in table] == [3, 3, 3, 3]
    assert [float(r["radius"]) for r in table] == [ALL_VOTES_RADIUS] * 4
    assert [int(r["correct"]) for r in table] == [int(label == 3) for label in DIGITS_LABELS]
    source = sidecar(out)["settings"]["model_source"]
    assert source["factory"] == f"{model_file}:build"
    assert source["file"] == str(model_file.resolve())
    assert source["file_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()

    # the same command resumes; changed code is other settings, refused, nothing changed
    before = out.with_suffix(".tsv").read_text()
    model_file.write_text(CONSTANT_MODEL.replace("(num_classes, 3)", "(num_classes, 4)"))
    result = invoke(certify_command, *FAST, "--model", f"{model_file}:build", "--out", str(out),
                    catch_exceptions=True)
    assert result.exit_code == 2 and "file_sha256" in result.output
    assert out.with_suffix(".tsv").read_text() == before


def test_module_factory_and_default_output_name(tmp_path, monkeypatch):
    package = tmp_path / "zoo_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(CONSTANT_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = invoke(certify_command, *FAST, "--model", "zoo_pkg.nets:build")
    assert result.exit_code == 0, result.output
    stem = tmp_path / "runs" / "certify_zoo_pkg.nets_build_digits_test_sigma0.25"
    assert [int(r["predict"]) for r in rows(stem)] == [3, 3, 3, 3]
    record = sidecar(stem)
    source = record["settings"]["model_source"]
    assert source["file_sha256"] == hashlib.sha256((package / "nets.py").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("missing.py:build", "no such file"),
        ("{file}:absent", "has no attribute 'absent'"),
        ("{file}:NOT_CALLABLE", "is not callable"),
        ("{file}:not_a_module", "returned a str, not a torch.nn.Module"),
        ("{file}:broken", "no weights here"),
        ("{file}:build_wide", "expected logits of shape [1, 10]"),
        ("no_such_package_xyz.nets:build", "cannot import module"),
    ],
)
def test_bad_factories_are_one_clear_error_and_write_nothing(tmp_path, model_file, factory,
                                                             message):
    out = tmp_path / "out" / "run"
    spec = factory.format(file=model_file)
    result = invoke(certify_command, *FAST, "--model", spec, "--out", str(out),
                    catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_checkpoint_option_does_not_apply_to_a_factory(tmp_path, model_file):
    result = invoke(certify_command, *FAST, "--model", f"{model_file}:build",
                    "--classifier-checkpoint", "x", "--out", str(tmp_path / "run"),
                    catch_exceptions=True)
    assert result.exit_code == 2 and "do not apply" in result.output
    assert not list(tmp_path.glob("run*"))


def test_threads_are_recorded_outside_the_settings_and_a_resume_may_change_them(tmp_path):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        result = invoke(certify_command, *FAST[:-3], "--max", "2", "--quiet", "--threads", "1",
                        "--out", str(out))
        assert result.exit_code == 0, result.output
        record = sidecar(out)
        assert record["threads"] == 1 and torch.get_num_threads() == 1
        assert "threads" not in record["settings"]
        first = out.with_suffix(".tsv").read_text()
        result = invoke(certify_command, *FAST, "--threads", "2", "--out", str(out))
        assert result.exit_code == 0, result.output
        assert sidecar(out)["threads"] == 2
        assert out.with_suffix(".tsv").read_text().startswith(first)
        assert len(rows(out)) == 4
    finally:
        torch.set_num_threads(threads)
    result = invoke(certify_command, *FAST, "--threads", "0", "--out", str(out),
                    catch_exceptions=True)
    assert result.exit_code == 2


def test_cohen_spellings_of_n_and_n0_are_aliases(tmp_path):
    out = tmp_path / "run"
    result = invoke(certify_command, "--N0", "20", "--N", "200", "--batch", "100", "--max", "2",
                    "--quiet", "--out", str(out))
    assert result.exit_code == 0, result.output
    settings = sidecar(out)["settings"]
    assert (settings["n"], settings["n0"]) == (200, 20)


# -- open_clip:ARCH/TAG and torchvision:NAME/WEIGHTS ---------------------------------------


def test_open_clip_by_architecture_with_a_local_checkpoint(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from classifiers import build_classifier
    from classifiers.weights_io import save_classifier_weights
    from tests.test_clip import CLASSES, TEMPLATES, hand_logits
    from tests.tiny_classifiers import register_tiny_clip

    arch = register_tiny_clip(tmp_path)
    torch.manual_seed(0)
    # a plain (GELU) config: what every non-OpenAI tag of such an architecture was trained with
    reference = open_clip.create_model(arch, pretrained=None).eval()
    checkpoint = save_classifier_weights(reference, tmp_path / "tiny.safetensors")
    classifier = build_classifier(f"open_clip:{arch}", class_names=CLASSES, templates=TEMPLATES,
                                  pretrained=str(checkpoint), cache_dir=str(tmp_path / "cache"))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), hand_logits(reference, images),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("model", "message"), [
    ("open_clip:No-Such-Arch/openai", "open_clip has no architecture 'No-Such-Arch'"),
    ("open_clip:ViT-B-16", "tags: openai"),
    ("open_clip:ViT-B-16/not_a_tag", "neither an open_clip pretrained tag"),
    ("torchvision:fasterrcnn_resnet50_fpn", "not a torchvision classification model"),
    ("torchvision:resnet18/IMAGENET1K_V9", "has no weights 'IMAGENET1K_V9'"),
    ("torchvision:resnet18", "predicts 1000 classes, but the task has 10"),
])
def test_library_models_by_name_refuse_bad_names(tmp_path, model, message):
    out = tmp_path / "out" / "run"
    result = invoke(certify_command, *FAST, "--model", model, "--out", str(out),
                    catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_torchvision_model_by_name_with_a_local_weights_file(tmp_path):
    import torchvision

    from classifiers import build_classifier

    torch.manual_seed(0)
    network = torchvision.models.mobilenet_v3_small(weights=None).eval()
    path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(network.state_dict(), path)
    classifier = build_classifier("torchvision:mobilenet_v3_small",
                                  class_names=[str(i) for i in range(1000)], pretrained=str(path))
    # torchvision's ImageNet evaluation mean/std
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), network((images - mean) / std))


def test_list_models_shows_the_prefix_arguments():
    result = invoke(certify_command, "--list-models")
    assert result.exit_code == 0
    for shown in ("cohen:PATH", "open_clip:ARCH/TAG", "torchvision:NAME[/WEIGHTS]", "folder:PATH"):
        assert shown in result.output
