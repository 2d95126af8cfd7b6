"""Reference set synthesis (Choi et al. 2024, Sec. 3.2, App. A.4) on tiny IF-I/IF-II pipelines.

The pipelines have DeepFloyd IF's classes (IFPipeline with a 3-in/6-out text-conditioned
UNet, IFSuperResolutionPipeline as tests/tiny_models.py builds it, a tiny T5 encoder and
tokenizer), are saved with save_pretrained and loaded back by folder, as a user's hub
ids are. Images are checked against the diffusers pipelines run by hand with the
recorded prompt and seed, not against our own output.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from adapt.errors import AdaptError
from adapt.references import ReferenceSetError, load_reference_set
from adapt.synthesize import synthesize
from denoisers import CheckpointNotFoundError
from denoisers.registry import UnreadableCheckpointError
from tests.tiny_models import go_offline, one_thread, save_tiny_if1, save_tiny_if2

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

CLASSES = ["dog", "cat"]
FAST = {"steps1": 2, "steps2": 2, "resolution": 32, "progress": False}  # tiny IF-II makes 32x32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("if")
    return {
        "stage1": str(save_tiny_if1(folder / "if1")),
        "stage2": str(save_tiny_if2(folder / "if2")),
    }


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """Two classes x two shots, made once for the module."""
    out = tmp_path_factory.mktemp("refs") / "set"
    return synthesize(CLASSES, out, shots=2, **models, **FAST)


def snapshot(folder):
    """Bytes and modification times of every file under `folder`."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixels(path):
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def test_writes_the_image_tree_and_manifest(reference, models):
    files = sorted(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file())
    assert files == [
        "images/0000/00.png", "images/0000/01.png", "images/0001/00.png", "images/0001/01.png",
        "manifest.json",
    ]
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["classes"] == CLASSES
    assert manifest["template"] == "a photo of a {}."
    records = manifest["images"]
    assert [(r["label"], r["shot"], r["class"], r["prompt"]) for r in records] == [
        (0, 0, "dog", "a photo of a dog."), (0, 1, "dog", "a photo of a dog."),
        (1, 0, "cat", "a photo of a cat."), (1, 1, "cat", "a photo of a cat."),
    ]
    assert all(r["models"] == models for r in records)
    assert len({r["seed"] for r in records}) == 4  # one stream per image
    for record in records:
        with Image.open(reference / record["path"]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
    # two shots of a class are two different images
    assert not np.array_equal(pixels(reference / records[0]["path"]),
                              pixels(reference / records[1]["path"]))


def test_each_image_is_the_ifi_ifii_cascade_at_its_recorded_prompt_and_seed(reference, models):
    """Run diffusers' two pipelines by hand (each encoding the prompt itself)."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    stage1 = IFPipeline.from_pretrained(models["stage1"])
    stage2 = IFSuperResolutionPipeline.from_pretrained(models["stage2"])
    record = json.loads((reference / "manifest.json").read_text())["images"][3]
    generator = torch.Generator().manual_seed(record["seed"])
    low = stage1(record["prompt"], num_inference_steps=2, generator=generator,
                 output_type="pt", clean_caption=False).images
    assert low.shape == (1, 3, 16, 16)
    image = stage2(image=low, prompt=record["prompt"], num_inference_steps=2,
                   generator=generator, clean_caption=False).images[0]
    np.testing.assert_array_equal(pixels(reference / record["path"]), np.asarray(image))


def test_a_rerun_into_a_new_folder_reproduces_the_set_and_any_subset(reference, models, tmp_path):
    again = synthesize(CLASSES, tmp_path / "again", shots=2, **models, **FAST)
    for path in ("images/0000/00.png", "images/0000/01.png", "images/0001/00.png",
                 "images/0001/01.png"):
        assert digest(again / path) == digest(reference / path)
    # fewer shots, and a prefix of the labels: the same images
    subset = synthesize(CLASSES[:1], tmp_path / "subset", shots=1, **models, **FAST)
    assert digest(subset / "images/0000/00.png") == digest(reference / "images/0000/00.png")
    assert not (subset / "images/0001").exists()


def test_other_seed_other_images(reference, models, tmp_path):
    other = synthesize(CLASSES[:1], tmp_path / "seed1", seed=1, **models, **FAST)
    assert digest(other / "images/0000/00.png") != digest(reference / "images/0000/00.png")


def test_resize_to_resolution(reference, models, tmp_path):
    small = synthesize(CLASSES[:1], tmp_path / "small", **models, **{**FAST, "resolution": 24})
    with Image.open(reference / "images/0000/00.png") as full:
        expected = np.asarray(full.convert("RGB").resize((24, 24), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(pixels(small / "images/0000/00.png"), expected)


def test_a_second_run_keeps_existing_files_and_only_fills_missing_ones(
    reference, models, tmp_path, monkeypatch
):
    folder = tmp_path / "resumed"
    shutil.copytree(reference, folder)  # copy2 keeps the modification times
    (folder / "images/0001/00.png").unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["images"][0]["device"] = "cuda:7"  # an earlier run's record: must be kept
    (folder / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(folder)

    synthesize(CLASSES, folder, shots=3, **models, **FAST)  # one missing + one new shot each

    after = snapshot(folder)
    for path in ("images/0000/00.png", "images/0000/01.png", "images/0001/01.png"):
        assert after[path] == before[path]  # same bytes, untouched (same mtime)
    assert digest(folder / "images/0001/00.png") == digest(reference / "images/0001/00.png")
    assert {"images/0000/02.png", "images/0001/02.png"} <= set(after)
    records = json.loads((folder / "manifest.json").read_text())["images"]
    assert [(r["label"], r["shot"]) for r in records] == [(c, s) for c in (0, 1) for s in (0, 1, 2)]
    assert records[0]["device"] == "cuda:7"

    # Complete: a rerun loads no model and changes nothing.
    def no_models(*args, **kwargs):
        raise AssertionError("models loaded although every image exists")

    monkeypatch.setattr("adapt.synthesize._load_pipelines", no_models)
    complete = snapshot(folder)
    synthesize(CLASSES, folder, shots=3, **models, **FAST)
    assert snapshot(folder) == complete


@pytest.mark.parametrize(
    "change",
    [
        {"template": "a picture of a {}."},
        {"seed": 1},
        {"stage2": "some/other-if2"},
        {"resolution": 24},
        {"steps1": 3},
        {"classes": ["cat", "dog"]},
    ],
    ids=["template", "seed", "model", "resolution", "steps", "classes"],
)
def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(
    reference, models, tmp_path, change
):
    folder = tmp_path / "set"
    shutil.copytree(reference, folder)
    before = snapshot(folder)
    settings = {**models, **FAST, "shots": 2, **change}
    classes = settings.pop("classes", CLASSES)
    with pytest.raises(AdaptError, match="other (settings|classes)"):
        synthesize(classes, folder, **settings)
    assert snapshot(folder) == before


def test_overwrite_regenerates_and_drops_the_old_images(reference, models, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(reference, folder)
    synthesize(CLASSES, folder, template="a picture of a {}.", overwrite=True, **models, **FAST)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["template"] == "a picture of a {}."
    assert [r["prompt"] for r in manifest["images"]] == ["a picture of a dog.",
                                                         "a picture of a cat."]
    assert digest(folder / "images/0000/00.png") != digest(reference / "images/0000/00.png")
    assert not (folder / "images/0000/01.png").exists()  # the old run's second shot


def test_a_folder_with_other_files_is_refused(models, tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(AdaptError, match="not empty"):
        synthesize(CLASSES, folder, **models, **FAST)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("classes", "template", "message"),
    [
        (["dog", "Dog "], "a photo of a {}.", "duplicate"),
        (["dog", ""], "a photo of a {}.", "blank"),
        ([], "a photo of a {}.", "no class names"),
        (["dog"], "a photo of a dog.", "placeholder"),
        (["dog"], "{} and {}", "placeholder"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    models, tmp_path, classes, template, message
):
    with pytest.raises(AdaptError, match=message):
        synthesize(classes, tmp_path / "out", template=template, **models, **FAST)
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_one_clear_error(tmp_path, monkeypatch):
    go_offline(monkeypatch, tmp_path / "empty_cache")
    with pytest.raises(CheckpointNotFoundError, match="IF-I-XL-v1.0.*hf download"):
        synthesize(["dog"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_load_reference_set_reads_the_manifest(reference):
    dataset = load_reference_set(reference)
    assert dataset.classes == CLASSES and len(dataset) == 4
    assert dataset.targets == [0, 0, 1, 1]
    image, label = dataset[2]
    assert label == 1 and image.shape == (3, 32, 32) and image.dtype == torch.float32
    expected = torch.from_numpy(pixels(reference / "images/0001/00.png")).permute(2, 0, 1) / 255
    torch.testing.assert_close(image, expected)
    resized, _ = load_reference_set(reference, size=16)[0]
    assert resized.shape == (3, 16, 16) and 0 <= resized.min() and resized.max() <= 1


def test_load_reference_set_reads_an_image_folder_and_converts_to_rgb(tmp_path):
    (tmp_path / "golden_retriever").mkdir()
    (tmp_path / "tabby_cat").mkdir()
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey, mode="L").save(tmp_path / "golden_retriever" / "a.png")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "tabby_cat" / "b.png")
    dataset = load_reference_set(tmp_path)
    assert dataset.classes == ["golden retriever", "tabby cat"] and dataset.manifest is None
    first, label = dataset[0]
    assert label == 0 and first.shape == (3, 8, 8)
    for channel in first:  # grey -> the same value in R, G and B
        torch.testing.assert_close(channel, torch.from_numpy(grey).float() / 255)
    second, label = dataset[1]
    assert label == 1 and second.shape == (3, 8, 8)
    assert torch.all(second[0] == 1) and torch.all(second[1:] == 0)  # alpha dropped


@pytest.mark.parametrize("layout", ["missing", "empty", "empty_classes", "manifest_without"])
def test_load_reference_set_without_images_is_one_clear_error(tmp_path, layout):
    folder = tmp_path / "refs"
    if layout != "missing":
        folder.mkdir()
    if layout == "empty_classes":
        (folder / "dog").mkdir()
        (folder / "dog" / "notes.txt").write_text("not an image")
    if layout == "manifest_without":
        (folder / "manifest.json").write_text(json.dumps({"classes": ["dog"], "images": []}))
    message = "not found" if layout == "missing" else "no images"
    with pytest.raises(ReferenceSetError, match=message):
        load_reference_set(folder)


def test_load_reference_set_names_a_listed_file_that_is_missing(reference, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(reference, folder)
    (folder / "images/0001/01.png").unlink()
    with pytest.raises(ReferenceSetError, match="images/0001/01.png.*missing"):
        load_reference_set(folder)


# -- the paper's scale: tensors between and out of the stages, batches, variants ----------


def test_both_stages_return_tensors_so_nothing_is_watermarked_or_dropped(
    models, reference, tmp_path, monkeypatch
):
    """Spy on the pipeline calls: "pt" output never reaches the IF pipelines' watermarker
    and safety checker (they act on PIL/NumPy output only), and neither is loaded."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    import adapt.synthesize as module

    calls = []
    for pipeline_class in (IFPipeline, IFSuperResolutionPipeline):
        original = pipeline_class.__call__

        @functools.wraps(original)  # the signature: synthesize reads its defaults
        def spy(self, *args, _original=original, **kwargs):
            calls.append((type(self).__name__, kwargs.get("output_type")))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(pipeline_class, "__call__", spy)
    loaded = {}
    original_load = module._load_pipelines

    def load(*args, **kwargs):
        loaded["pipelines"] = original_load(*args, **kwargs)
        return loaded["pipelines"]

    monkeypatch.setattr(module, "_load_pipelines", load)
    out = synthesize(CLASSES, tmp_path / "set", shots=2, **models, **FAST)
    assert calls == [("IFPipeline", "pt"), ("IFSuperResolutionPipeline", "pt")] * 4
    for pipeline in loaded["pipelines"]:
        assert pipeline.watermarker is None and pipeline.safety_checker is None
    records = json.loads((out / "manifest.json").read_text())["images"]
    assert len(records) == 4 and all(r["nsfw_detected"] is None for r in records)
    assert len(load_reference_set(out)) == 4  # nothing skipped
    # and the images are those of the "pil" path of a pipeline without either component
    for path in ("images/0000/00.png", "images/0001/01.png"):
        assert digest(out / path) == digest(reference / path)


def test_batched_synthesis_makes_the_images_made_one_by_one(models, reference, tmp_path,
                                                            monkeypatch):
    from diffusers import IFPipeline

    batches = []
    original = IFPipeline.__call__

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        batches.append(len(kwargs["generator"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IFPipeline, "__call__", spy)
    out = synthesize(CLASSES, tmp_path / "batched", shots=2, batch_size=3, **models, **FAST)
    assert batches == [3, 1]  # (dog 0, dog 1, cat 0), (cat 1): classes mixed in a call
    for path in ("images/0000/00.png", "images/0000/01.png", "images/0001/00.png",
                 "images/0001/01.png"):
        # Each image from its own generator, as alone; the batched convolutions round
        # differently in the last float bits, which moves a rare pixel value by one of
        # 255 (seen: 1 value in 3072). Another seed changes most values by far more.
        batched, alone = pixels(out / path).astype(int), pixels(reference / path).astype(int)
        assert np.abs(batched - alone).max() <= 1, path
        assert (batched != alone).mean() < 0.01, path
    other = pixels(reference / "images/0000/01.png").astype(int)
    assert (pixels(out / "images/0000/00.png").astype(int) != other).mean() > 0.5
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert "batch_size" not in settings  # not a setting of the set: a rerun may change it


def test_checkpoint_variants_load_with_variant(models, reference, tmp_path):
    """IF-I and IF-II saved only as *.fp16.safetensors (DeepFloyd's fp16 variant layout)."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    variants = {}
    for stage, pipeline_class in (("stage1", IFPipeline),
                                  ("stage2", IFSuperResolutionPipeline)):
        pipeline = pipeline_class.from_pretrained(models[stage])
        variants[stage] = str(tmp_path / f"{stage}_fp16")
        pipeline.save_pretrained(variants[stage], safe_serialization=True, variant="fp16")
    with pytest.raises(UnreadableCheckpointError, match="--variant fp16"):
        synthesize(CLASSES[:1], tmp_path / "plain", **variants, **FAST)
    out = synthesize(CLASSES[:1], tmp_path / "fp16", variant="fp16", **variants, **FAST)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["variant"] == "fp16"
    # the same weights under other file names: the same pixels (the PNG's text names the
    # model folders, so the bytes differ)
    np.testing.assert_array_equal(pixels(out / "images/0000/00.png"),
                                  pixels(reference / "images/0000/00.png"))


def test_the_reference_files_honour_the_umask(models, tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        out = synthesize(CLASSES[:1], tmp_path / "set", **models, **FAST)
    finally:
        os.umask(previous)
    for path in [out, *out.rglob("*")]:
        expected = 0o755 if path.is_dir() else 0o644  # not tempfile's private 0600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
