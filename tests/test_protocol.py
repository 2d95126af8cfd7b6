"""`--protocol choi2024`: the settings of Choi et al.'s code (robustify-T2I), one flag away.

The expected strings below are written out from that code (evaluate.py, utils.py,
TeCoA/utils.py, TeCoA/cross_datasets.py, replace/*.py), not taken from the module under
test. Data are fakes in torchvision's layouts (Caltech-256, EuroSAT) and class-folder
trees; the IF-II pipeline is the tiny one of tests/tiny_models.py.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from classifiers import CLASSIFIERS
from classifiers.datasets import dataset_class_names
from classifiers.protocols import CHOI2024, PROTOCOLS, ProtocolError, get_protocol
from classifiers.registry import Entry
from cli.denoise import denoise_command
from cli.main import certify_command, predict_command
from tests.cli_helpers import invoke, rows, sidecar
from tests.tiny_models import save_tiny_if2

# (CLIP template, IF-II template) per dataset, as the reference code has them.
REFERENCE_TEMPLATES = {
    "imagenet": ("This is a photo of a {}", "This is a photo of a {}."),
    "stl10": ("This is a photo of a {}", "This is a photo of a {}."),
    "sun397": ("This is a photo of a {}", "This is a photo of a {}."),
    "cars": ("A photo of a {}.", "A photo of a {}."),
    "caltech256": ("A photo of a {}.", "A photo of a {}."),
    "food101": ("A photo of {}, a type of food.", "A photo of a {}, a type of food."),
    "pets": ("A photo of a {}, a type of pet.", "A photo of a {}, a type of pet."),
    "flowers102": ("A photo of a {}, a type of flower.", "A photo of a {}, a type of flower."),
    "dtd": ("A surface with a {} texture.", "A surface with a {} texture."),
    "eurosat": ("A centered satellite photo of {}.", "A centered satellite photo of {}."),
    "cropdiseases": ("A leaf photo of {}.", "A leaf photo of {}."),
    # evaluate.py passes "isic" to return_prompt, whose ISIC branch tests "isic2018"
    "isic": ("A photo of {}.", "This is a photo of a {}."),
}

CALTECH_FOLDERS = [f"{i:03d}.class{i}" for i in range(1, 258)]
CALTECH_FOLDERS[0], CALTECH_FOLDERS[1] = "001.ak47", "002.american-flag"
CALTECH_FOLDERS[250], CALTECH_FOLDERS[252] = "251.airplanes-101", "253.faces-easy-101"
PER_CLASS = 4  # 257 * 4 = 1028 images: floor(1028 / 500) = 2


@pytest.fixture(scope="module")
def caltech_root(tmp_path_factory):
    """Caltech-256 in torchvision's layout, tiny images (256_ObjectCategories/NNN.name/)."""
    root = tmp_path_factory.mktemp("caltech")
    base = root / "caltech256" / "256_ObjectCategories"
    for number, folder in enumerate(CALTECH_FOLDERS, start=1):
        (base / folder).mkdir(parents=True)
        for j in range(1, PER_CLASS + 1):
            shade = (number * 7 + j * 50) % 256
            Image.new("RGB", (12, 10), (shade, 255 - shade, 90)).save(
                base / folder / f"{number:03d}_{j:04d}.jpg", quality=95
            )
    return root


@pytest.fixture(scope="module")
def if2_dir(tmp_path_factory):
    return save_tiny_if2(tmp_path_factory.mktemp("if2"))


@pytest.fixture
def native_size(monkeypatch):
    """Keep the fakes' own 12 x 10 size: IF-II on 224 x 224 crops is slow on a CPU."""
    from classifiers.datasets import image_transform

    monkeypatch.setattr("classifiers.datasets.image_transform",
                        lambda size="crop": image_transform("native"))


# -- facts --------------------------------------------------------------------------------


def test_the_protocol_covers_the_papers_datasets_with_the_reference_templates():
    assert list(PROTOCOLS) == ["choi2024"]
    assert get_protocol("choi2024") is CHOI2024
    assert set(CHOI2024.datasets) == set(REFERENCE_TEMPLATES)
    for name, (clip_template, if2_template) in REFERENCE_TEMPLATES.items():
        facts = CHOI2024.for_dataset(name)
        assert (facts.clip_template, facts.if2_template) == (clip_template, if2_template), name
    with pytest.raises(ProtocolError, match="unknown protocol 'mao2023'; known: choi2024"):
        get_protocol("mao2023")
    for uncovered in ("cifar10", "caltech101", "digits", "folder:/x"):
        with pytest.raises(ProtocolError, match=f"does not cover dataset '{uncovered}'"):
            CHOI2024.for_dataset(uncovered)


@pytest.mark.parametrize(
    ("length", "skip", "count", "last"),
    [
        (8000, 16, 500, 7984),  # STL-10's test split
        (25250, 50, 505, 25200),  # Food-101's test split
        (10015, 20, 501, 10000),  # ISIC 2018 Task 3
        (1028, 2, 514, 1026),
        (999, 1, 999, 998),  # floor(999 / 500) = 1: every example
        (500, 1, 500, 499),
    ],
)
def test_subsample_is_every_floor_len_over_500th_example(length, skip, count, last):
    indices = CHOI2024.subsample(length)
    assert CHOI2024.subsample_skip(length) == skip
    assert (len(indices), indices[0], indices[-1]) == (count, 0, last)
    # evaluate.py's loop: `if i % skip != 0: continue`
    assert indices == [i for i in range(length) if i % skip == 0]


def test_subsample_of_fewer_than_500_examples_is_refused():
    with pytest.raises(ProtocolError, match="has 499 .< 500."):
        CHOI2024.subsample(499)


def test_class_names_follow_the_reference_rules():
    rules = {
        "cars": ("AM General Hummer SUV 2000", "am general hummer suv"),
        "sun397": ("apartment_building/outdoor", "apartment building outdoor"),
        "stl10": ("airplane", "airplane"),
        "food101": ("apple_pie", "apple pie"),
        "pets": ("American Pit Bull Terrier", "american pit bull terrier"),
        "eurosat": ("SeaLake", "sealake"),
        "dtd": ("banded", "banded"),
        "caltech256": ("253.faces-easy-101", "faces easy"),
    }
    for dataset, (raw, expected) in rules.items():
        assert CHOI2024.class_names(dataset, [raw]) == [expected], dataset
    # Names the reference code lists itself need no data.
    assert CHOI2024.class_names("imagenet", None)[:2] == ["tench", "goldfish"]
    flowers = CHOI2024.class_names("flowers102", None)
    assert (flowers[0], flowers[11], flowers[15], flowers[87], flowers[92]) == (
        "pink primrose", "colts foot", "globe flower", "cyclamen ", "ball moss")
    crops = CHOI2024.class_names("cropdiseases", None)
    assert (len(crops), crops[0], crops[12], crops[37]) == (
        38, "apple scab", "grape black measles (esca)", "tomato healthy")
    assert CHOI2024.class_names("isic", None) == [
        "melanoma", "melanocytic nevus", "basal cell carcinoma", "actinic keratosis",
        "benign keratosis", "dermatofibroma", "vascular lesion"]


def test_protocol_dataset_on_fake_caltech256(caltech_root):
    dataset = CHOI2024.build_dataset("caltech256", data_root=str(caltech_root))
    assert len(dataset) == 257 * PER_CLASS and len(dataset.classes) == 257
    assert dataset.classes[:2] == ["ak47", "american flag"]
    assert (dataset.classes[250], dataset.classes[252]) == ("airplanes", "faces easy")
    assert dataset.templates == ["A photo of a {}."]
    image, label = dataset[PER_CLASS + 1]
    assert label == 1
    assert image.shape == (3, 224, 224)  # resize 256, center crop 224


def test_protocol_dataset_on_fake_eurosat_uses_the_folder_names(tmp_path):
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
               "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]
    for folder in folders:
        path = tmp_path / "eurosat" / "2750" / folder / f"{folder}_1.jpg"
        path.parent.mkdir(parents=True)
        Image.new("RGB", (64, 64), (10, 200, 30)).save(path)
    dataset = CHOI2024.build_dataset("eurosat", data_root=str(tmp_path))
    assert dataset.classes == [f.lower() for f in folders]  # "sealake", not "lake or sea"
    assert dataset_class_names("eurosat")[9] == "lake or sea"  # the plain default differs
    assert dataset.templates == ["A centered satellite photo of {}."]


def test_preprocessing_is_the_reference_transform():
    # TeCoA/utils.py preprocess224 (v1 Resize(256), CenterCrop(224), ToTensor) and STL-10's
    # ToTensor at 96 x 96 give the same 8-bit pixels as ours (the float scaling of v1 and
    # v2 differ by one float32 ulp, x / 255 against x * (1 / 255)).
    from torchvision import transforms

    from classifiers.datasets import image_transform

    def eight_bit(image: torch.Tensor) -> torch.Tensor:
        return (image.as_subclass(torch.Tensor) * 255).round().to(torch.uint8)

    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(300, 410, 3, generator=generator) * 255).to(torch.uint8).numpy()
    photo = Image.fromarray(pixels)
    reference = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    ours = image_transform("crop")(photo)
    assert ours.shape == (3, 224, 224)
    assert torch.equal(eight_bit(ours), eight_bit(reference(photo)))
    stl = Image.fromarray(pixels[:96, :96])
    assert torch.equal(eight_bit(image_transform("stl")(stl)),
                       eight_bit(transforms.ToTensor()(stl)))
    assert torch.equal(eight_bit(image_transform("stl")(stl)),
                       torch.from_numpy(pixels[:96, :96]).permute(2, 0, 1))


def test_clip_prompts_are_the_template_with_each_class_name(caltech_root, tmp_path,
                                                              monkeypatch):
    pytest.importorskip("open_clip")
    from classifiers import build_classifier
    from tests.tiny_classifiers import clip_options, save_tiny_clip

    dataset = CHOI2024.build_dataset("caltech256", data_root=str(caltech_root))
    options = clip_options(save_tiny_clip(tmp_path / "clip"), tmp_path / "cache")
    options["templates"] = dataset.templates
    texts = []
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    monkeypatch.setattr("open_clip.get_tokenizer", lambda *a, **k: (
        lambda batch, *args, **kwargs: texts.extend(batch) or tokenizer(batch, *args, **kwargs)))
    build_classifier("clip-b32", class_names=dataset.classes[:3], **options)
    assert texts == ["A photo of a ak47.", "A photo of a american flag.", "A photo of a class3."]


# -- the command line ---------------------------------------------------------------------


@contextmanager
def recording_classifier():
    """A registered model that records the class names and templates it is built with."""
    built = []

    def builder(*, class_names, sigma=None, templates=None, weights=None, device="cpu"):
        built.append({"class_names": list(class_names), "templates": list(templates or [])})
        return ConstantClassifier(len(class_names))

    CLASSIFIERS._entries["recorder"] = Entry("recorder", builder, "test model")
    try:
        yield built
    finally:
        del CLASSIFIERS._entries["recorder"]


class ConstantClassifier(torch.nn.Module):
    """Votes for class 1 whatever the image."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(images.shape[0], self.num_classes, device=images.device)
        logits[:, 1] = 1.0
        return logits


FAST = ["--n0", "2", "--n", "4", "--batch", "4", "--quiet", "--device", "cpu"]


def test_certify_under_the_protocol(caltech_root, tmp_path):
    stem = tmp_path / "run"
    with recording_classifier() as built:
        result = invoke(certify_command, "--protocol", "choi2024", "--dataset", "caltech256",
                        "--data-root", str(caltech_root), "--model", "recorder", "--max", "3",
                        "--out", str(stem), *FAST, catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert [row["idx"] for row in rows(stem)] == ["0", "2", "4"]  # every 2nd of 1028
    assert built[0]["templates"] == ["A photo of a {}."]
    assert built[0]["class_names"][:2] == ["ak47", "american flag"]
    record = sidecar(stem)
    protocol = record["settings"]["protocol"]
    assert protocol["name"] == "choi2024"
    assert protocol["subsample"] == {"rule": "every floor(len/500)-th from 0",
                                     "length": 1028, "skip": 2}
    assert protocol["clip_template"] == "A photo of a {}."
    assert protocol["explicit_options"].startswith("refused")
    assert record["selection"]["skip"] == 2


@pytest.mark.parametrize(("token", "text"), [("", "A photo of a ."), ("sks", "A photo of a sks.")])
def test_predict_with_if2_under_the_protocol(caltech_root, if2_dir, tmp_path, monkeypatch,
                                             native_size, token, text):
    from diffusers import IFSuperResolutionPipeline
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    prompts, tokenized = [], []
    encode = IFSuperResolutionPipeline.encode_prompt
    call = PreTrainedTokenizerBase.__call__

    def spy_encode(self, prompt, *args, **kwargs):
        prompts.append(prompt)
        return encode(self, prompt, *args, **kwargs)

    def spy_tokenizer(self, text=None, *args, **kwargs):
        tokenized.append(text)
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(IFSuperResolutionPipeline, "encode_prompt", spy_encode)
    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy_tokenizer)
    stem = tmp_path / "if2"
    with recording_classifier():
        result = invoke(predict_command, "--protocol", "choi2024", "--dataset", "caltech256",
                        "--data-root", str(caltech_root), "--model", "recorder",
                        "--denoiser", "if2", "--denoiser-checkpoint", str(if2_dir), "--max", "1",
                        "--out", str(stem), "--n", "4", "--batch", "4", "--quiet",
                        "--device", "cpu", "--token", token, catch_exceptions=True)
    assert result.exit_code == 0, result.output
    # Eq. 9: the dataset's template with an empty label, or the token after `adapt`
    # (diffusers lower-cases the text before its tokenizer, as in the reference's pipeline;
    # encode_prompt calls it twice: for the ids, and untruncated to warn on length).
    assert prompts == [text]
    assert tokenized and all(batch == [text.lower()] for batch in tokenized)
    denoiser = sidecar(stem)["settings"]["denoiser"]
    assert denoiser["prompt"] == text and denoiser["token"] == token
    assert denoiser["prompt_template"] == "A photo of a {}."
    assert denoiser["timestep_rounding"] == "reference"
    assert denoiser["corrected_timestep"] == pytest.approx(289 * 1.8)  # sigma 0.25


def test_denoise_under_the_protocol_with_k_zero(caltech_root, if2_dir, tmp_path, monkeypatch,
                                                native_size):
    from diffusers import UNet2DConditionModel

    labels = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, *args, class_labels=None, **kwargs):
        labels.append(class_labels.clone())
        return forward(self, sample, timestep, *args, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    result = invoke(denoise_command, "--protocol", "choi2024", "--dataset", "caltech256",
                    "--data-root", str(caltech_root), "--indices", "0", "--sigmas", "0.25",
                    "--denoiser", "if2", "--denoiser-checkpoint", str(if2_dir), "--k", "0,1.8",
                    "--device", "cpu", "--out", str(tmp_path / "grid.png"), catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert [label.tolist() for label in labels] == [[0.0], [pytest.approx(520.2, abs=1e-4)]]
    assert all(label.dtype == torch.float32 for label in labels)  # reference rounding


@pytest.mark.parametrize(("args", "rounding", "label"), [
    ([], "floor", 520), (["--timestep-rounding", "reference"], "reference", 289 * 1.8)])
def test_timestep_rounding_is_recorded_either_way(if2_dir, tmp_path, native_size, args,
                                                  rounding, label):
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("RGB", (12, 10), (200, 30, 30)).save(tmp_path / "images" / name / "a.png")
    with recording_classifier():
        result = invoke(certify_command, "--dataset", f"folder:{tmp_path / 'images'}",
                        "--model", "recorder", "--denoiser", "if2",
                        "--denoiser-checkpoint", str(if2_dir), "--max", "1",
                        "--out", str(tmp_path / "run"), *args, *FAST, catch_exceptions=True)
    assert result.exit_code == 0, result.output
    settings = sidecar(tmp_path / "run")["settings"]
    assert settings["protocol"] is None
    assert settings["denoiser"]["timestep_rounding"] == rounding
    assert settings["denoiser"]["corrected_timestep"] == pytest.approx(label)
    assert isinstance(settings["denoiser"]["corrected_timestep"],
                      int if rounding == "floor" else float)
    assert settings["denoiser"]["prompt"] == ""  # the plain default


def test_k_zero_is_accepted_and_negative_k_refused(tmp_path):
    ok = invoke(certify_command, "--k", "0", "--max", "1", "--n0", "2", "--n", "4", "--quiet",
                "--out", str(tmp_path / "k0"), catch_exceptions=True)
    assert ok.exit_code == 0, ok.output
    bad = invoke(certify_command, "--k", "-0.2", "--out", str(tmp_path / "kneg"),
                 catch_exceptions=True)
    assert bad.exit_code == 2 and "--k" in bad.output and "must be >= 0" in bad.output
    assert not (tmp_path / "kneg.tsv").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--protocol", "mao2023", "--dataset", "caltech256"],
         "unknown protocol 'mao2023'; known: choi2024"),
        (["--protocol", "choi2024"], "does not cover dataset 'digits'"),
        (["--protocol", "choi2024", "--dataset", "cifar10"], "does not cover dataset 'cifar10'"),
        (["--protocol", "choi2024", "--dataset", "caltech256", "--template", "a {}"],
         "--protocol choi2024 fixes --template"),
        (["--protocol", "choi2024", "--dataset", "caltech256", "--denoiser", "if2",
          "--prompt", "a photo of a {}."], "--protocol choi2024 fixes --prompt"),
        (["--protocol", "choi2024", "--dataset", "caltech256", "--denoiser", "if2",
          "--timestep-rounding", "floor"], "--protocol choi2024 fixes --timestep-rounding"),
        (["--protocol", "choi2024", "--dataset", "caltech256", "--skip", "3"],
         "--protocol choi2024 fixes --skip"),
        (["--protocol", "choi2024", "--dataset", "caltech256", "--start", "4"],
         "--protocol choi2024 fixes --start"),
        (["--dataset", "caltech256", "--timestep-rounding", "reference"],
         "--timestep-rounding applies to --denoiser if2 only"),
    ],
)
def test_bad_protocol_input_gives_one_message_and_exit_2(caltech_root, tmp_path, args,
                                                         message):
    stem = tmp_path / "refused"
    with recording_classifier():
        result = invoke(certify_command, "--model", "recorder", "--data-root", str(caltech_root),
                        *args, "--out", str(stem), *FAST, catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.count("Error") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_values_equal_to_the_protocols_are_not_conflicts(caltech_root, tmp_path):
    with recording_classifier() as built:
        result = invoke(certify_command, "--protocol", "choi2024", "--dataset", "caltech256",
                        "--data-root", str(caltech_root), "--model", "recorder",
                        "--template", "A photo of a {}.", "--skip", "2", "--start", "0",
                        "--max", "1", "--out", str(tmp_path / "same"), *FAST, catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert built[0]["templates"] == ["A photo of a {}."]


def test_protocol_on_fewer_than_500_examples_is_refused(tmp_path):
    for number, folder in enumerate(CALTECH_FOLDERS, start=1):
        path = tmp_path / "data" / "caltech256" / "256_ObjectCategories" / folder
        path.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(path / f"{number:03d}_0001.jpg")  # 257 images
    with recording_classifier():
        result = invoke(certify_command, "--protocol", "choi2024", "--dataset", "caltech256",
                        "--data-root", str(tmp_path / "data"), "--model", "recorder",
                        "--out", str(tmp_path / "r"), *FAST, catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert "this dataset has 257 (< 500)" in result.output
    assert not (tmp_path / "r.tsv").exists()
