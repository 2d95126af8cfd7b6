"""The `adapt` command group: bad input gives one clear message and exit 2 with nothing
written or overwritten; `adapt run` on tiny models ends with a `certify` command that runs.

Tiny models of the real classes: DeepFloyd IF-I/IF-II pipelines from tests/tiny_models.py
and an open_clip CLIP of a tiny registered config (random weights saved as safetensors),
registered as the classifier `tiny-clip` for the duration of a test, so the commands
are exercised through the same builders and options a user's `clip-b32` goes through.
"""

from __future__ import annotations

import json
import shlex
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from adapt.references import check_template, dataset_labels, read_labels
from cli.adapt import adapt_group
from tests.cli_helpers import invoke, rows, sidecar
from tests.tiny_models import go_offline, one_thread, save_tiny_if1, save_tiny_if2

CLIP_ARCH = "robustify-test-adapt-clip"
CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


# click's runner catches what the command raises (exit code 1), as it does by default
run_adapt = partial(invoke, adapt_group, catch_exceptions=True)


def assert_refused(result, *words: str) -> None:
    """Exit 2 with one 'Error: ...' message, naming what is wrong, and no traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word.lower() in result.output.lower(), result.output
    assert "Traceback" not in result.output


def snapshot(folder):
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def labels(tmp_path):
    def write(text: str):
        path = tmp_path / "labels.txt"
        path.write_text(text, encoding="utf-8")
        return path

    return write


# -- labels and templates ---------------------------------------------------------------------


def test_read_labels_strips_and_ignores_trailing_blank_lines(labels):
    assert read_labels(labels("\ufeff golden retriever \ntabby cat\n\n  \n")) == [
        "golden retriever", "tabby cat",
    ]


def test_dataset_labels_are_the_datasets_class_names():
    assert dataset_labels("cifar10") == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ]
    # ImageNet's CLIP names repeat two names for distinct labels: a warning, not an error.
    with pytest.warns(UserWarning, match="more than once"):
        assert len(dataset_labels("imagenet")) == 1000


def test_check_template():
    assert check_template("a photo of a {}.") == "a photo of a {}."
    for bad in ("a photo", "{} and {}", "a photo of a {c}."):
        with pytest.raises(ValueError, match="exactly one"):
            check_template(bad)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", ["empty"]),
        ("\n \n", ["empty"]),
        ("dog\ncat\nDog\n", ["duplicate", "'dog' (label 0)", "'Dog' (label 2)"]),
        ("dog\n\ncat\n", ["line 2 is blank"]),
    ],
    ids=["empty", "only-blank", "duplicate", "blank-line"],
)
def test_bad_labels_file(labels, tmp_path, text, words):
    out = tmp_path / "refs"
    result = run_adapt("synthesize", "--labels", labels(text), "--out", out, "--device", "cpu")
    assert_refused(result, *words)
    assert not out.exists()


def test_missing_labels_file(tmp_path):
    result = run_adapt("synthesize", "--labels", tmp_path / "nope.txt", "--out", tmp_path / "o")
    assert_refused(result, "labels file not found", "nope.txt")


@pytest.mark.parametrize("template", ["a photo of a dog.", "{} next to {}"])
def test_template_needs_exactly_one_placeholder(labels, tmp_path, template):
    out = tmp_path / "refs"
    result = run_adapt("synthesize", "--labels", labels("dog\ncat\n"), "--template", template,
                       "--out", out, "--device", "cpu")
    assert_refused(result, "placeholder", template)
    assert not out.exists()


def test_labels_or_dataset_exactly_one(labels, tmp_path):
    both = run_adapt("synthesize", "--labels", labels("dog\n"), "--dataset", "cifar10",
                     "--out", tmp_path / "o")
    neither = run_adapt("synthesize", "--out", tmp_path / "o")
    for result in (both, neither):
        assert result.exit_code == 2 and "exactly one of --labels FILE or --dataset NAME" in \
            result.output
    assert not (tmp_path / "o").exists()


def test_synthesize_refuses_a_folder_with_another_reference_set(labels, tmp_path):
    out = tmp_path / "refs"
    out.mkdir()
    manifest = {"classes": ["dog"], "template": "art of a {}.", "images": [],
                "settings": {"template": "art of a {}.", "seed": 0}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(out)
    result = run_adapt("synthesize", "--labels", labels("dog\n"), "--out", out, "--device", "cpu")
    assert_refused(result, "other settings", "'art of a {}.'", "--overwrite")
    assert snapshot(out) == before


# -- reference folders ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["personalize", "finetune"])
@pytest.mark.parametrize("layout", ["missing", "empty", "no-image-files"])
def test_reference_folder_without_images(tmp_path, command, layout):
    references = tmp_path / "refs"
    if layout != "missing":
        references.mkdir()
    if layout == "no-image-files":
        (references / "dog").mkdir()
        (references / "dog" / "readme.txt").write_text("no image here")
    out = tmp_path / "out"
    result = run_adapt(command, "--references", references, "--out", out, "--device", "cpu")
    assert_refused(result, "not found" if layout == "missing" else "holds no images")
    assert not out.exists()


# -- tiny models ------------------------------------------------------------------------------


@contextmanager
def tiny_clip_registered():
    """`tiny-clip`: the CLIP builder on a tiny architecture, as a registered model name."""
    from classifiers import CLASSIFIERS
    from classifiers.clip import build_clip
    from classifiers.registry import Entry

    builder = partial(build_clip, "clip-b32", arch=CLIP_ARCH)
    CLASSIFIERS._entries["tiny-clip"] = Entry("tiny-clip", builder, "tiny CLIP for tests")
    try:
        yield
    finally:
        del CLASSIFIERS._entries["tiny-clip"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of the tiny IF-I and IF-II pipelines and the tiny CLIP's weights file."""
    open_clip = pytest.importorskip("open_clip")
    import torch

    from classifiers.weights_io import save_classifier_weights

    folder = tmp_path_factory.mktemp("tiny_models")
    config = folder / f"{CLIP_ARCH}.json"
    config.write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    clip = open_clip.create_model(CLIP_ARCH, pretrained=None, force_quick_gelu=True).eval()
    return {
        "stage1": save_tiny_if1(folder / "if1"),
        "stage2": save_tiny_if2(folder / "if2"),
        "clip": save_classifier_weights(clip, folder / "tiny_clip.safetensors"),
    }


@pytest.fixture
def offline(tiny, tmp_path, monkeypatch):
    """No Hub access, CLIP's text-embedding cache in the test's folder, tiny-clip registered."""
    go_offline(monkeypatch, tmp_path / "hub_cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with tiny_clip_registered():
        yield tiny


def image_folder(root, classes, size=32, per_class=1):
    """A small ImageFolder tree of flat-colored images."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            color = (40 + 150 * label, 90 + 30 * i, 200 - 120 * label)
            Image.new("RGB", (size, size), color).save(root / name / f"{i}.png")
    return root


def test_synthesize_command_on_tiny_models(labels, tmp_path, offline):
    out = tmp_path / "refs"
    args = ["synthesize", "--labels", labels("dog\ncat\n"), "--out", out,
            "--stage1", offline["stage1"], "--stage2", offline["stage2"], "--resolution", "32",
            "--stage1-steps", "2", "--stage2-steps", "2", "--device", "cpu", "--quiet"]
    result = run_adapt(*args)
    assert result.exit_code == 0, result.output
    assert "2 images generated, 0 kept" in result.output
    assert json.loads((out / "manifest.json").read_text())["classes"] == ["dog", "cat"]
    again = run_adapt(*args)
    assert again.exit_code == 0 and "0 images generated, 2 kept" in again.output


PERSONALIZE_FAST = ["--steps", "2", "--batch-size", "2", "--checkpoint-every", "1",
                    "--device", "cpu", "--quiet"]
FINETUNE_FAST = ["--epochs", "1", "--batch-size", "2", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize(
    ("command", "files"),
    [
        ("personalize", {"pytorch_lora_weights.safetensors": b"other run's LoRA",
                         "adapt_config.json": json.dumps({"kind": "personalize",
                                                          "status": "complete",
                                                          "settings": {"steps": 12345}})}),
        ("finetune", {"classifier.safetensors": b"other run's classifier",
                      "finetune_config.json": json.dumps({"kind": "finetune",
                                                          "status": "complete",
                                                          "settings": {"epochs": 99}})}),
    ],
)
def test_an_output_folder_holding_another_runs_weights_is_refused(
    tmp_path, offline, command, files
):
    pytest.importorskip(f"adapt.{command}")
    references = image_folder(tmp_path / "refs", ["cat", "dog"])
    out = tmp_path / "out"
    out.mkdir()
    for name, content in files.items():
        data = content if isinstance(content, bytes) else content.encode()
        (out / name).write_bytes(data)
    before = snapshot(out)
    model = ["--classifier", "tiny-clip", "--classifier-checkpoint", offline["clip"]]
    if command == "personalize":
        args = ["--checkpoint", offline["stage2"], *PERSONALIZE_FAST]
    else:
        args = ["--denoiser-checkpoint", offline["stage2"], *FINETUNE_FAST]
    result = run_adapt(command, "--references", references, "--out", out, *model, *args)
    assert_refused(result, str(out), "--overwrite")
    assert snapshot(out) == before


def test_adapt_run_ends_with_a_certify_command_that_runs(labels, tmp_path, offline):
    """The whole chain on tiny models: 2 classes, 1 shot, 2 personalization steps, 1 epoch."""
    pytest.importorskip("adapt.personalize")
    pytest.importorskip("adapt.finetune")
    from cli.main import certify_command

    out = tmp_path / "run"
    result = run_adapt(
        "run", "--labels", labels("cat\ndog\n"), "--out", out,
        "--classifier", "tiny-clip", "--classifier-checkpoint", offline["clip"],
        "--stage1", offline["stage1"], "--stage2", offline["stage2"],
        "--checkpoint", offline["stage2"], "--resolution", "32",
        "--stage1-steps", "2", "--stage2-steps", "2",
        "--steps", "2", "--batch-size", "2", "--epochs", "1", "--finetune-batch-size", "2",
        "--sigma", "0.5", "--device", "cpu", "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert (out / "references" / "manifest.json").is_file()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "classifier" / "classifier.safetensors").is_file()

    lines = [line for line in result.output.splitlines() if line.startswith("certify ")]
    assert len(lines) == 1, result.output
    assert (out / "certify_command.txt").read_text().strip() == lines[0]
    args = shlex.split(lines[0])[1:]
    expected = {
        "--model": "tiny-clip",
        "--classifier-weights": str((out / "classifier" / "classifier.safetensors").resolve()),
        "--denoiser": "if2",
        "--denoiser-checkpoint": str(offline["stage2"].resolve()),
        "--lora": str((out / "lora").resolve()),
        "--prompt": "a photo of a {}.",
        "--token": "sks",
        "--sigma": "0.5",
        "--dataset": "folder:IMAGES_DIR",
    }
    for flag, value in expected.items():
        assert args[args.index(flag) + 1] == value, lines[0]

    test_images = image_folder(tmp_path / "test_images", ["cat", "dog"])
    args[args.index("--dataset") + 1] = f"folder:{test_images}"
    # The folder dataset crops to 224 x 224, where even the tiny IF-II takes seconds per
    # image on a CPU: a handful of noise samples shows the command runs end to end.
    certified = invoke(certify_command, *args, "--n0", "1", "--n", "1", "--max", "2", "--quiet",
                       catch_exceptions=True)
    assert certified.exit_code == 0, certified.output
    stem = Path(args[args.index("--out") + 1])
    table = rows(stem)
    assert list(table[0])[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    assert [row["label"] for row in table] == ["0", "1"]
    settings = sidecar(stem)["settings"]
    assert settings["denoiser"]["lora"] == str((out / "lora").resolve())
    assert settings["denoiser"]["prompt"] == "a photo of a sks."


# -- inputs and outputs, options threaded to the library ----------------------------------------


@pytest.mark.parametrize(
    ("command", "flag"),
    [("finetune", "--lora"), ("finetune", "--references"), ("personalize", "--references"),
     ("personalize", "--checkpoint")],
)
def test_an_input_that_is_the_output_folder_is_refused_even_with_overwrite(
    tmp_path, command, flag
):
    """`--overwrite` deletes only this command's outputs: an input at --out is refused."""
    from tests.tiny_models import save_tiny_if2_lora

    shared = save_tiny_if2_lora(tmp_path / "shared")  # a LoRA folder (personalize's output)
    image_folder(shared, ["cat", "dog"])  # and a reference set, for --references
    before = snapshot(shared)
    references = ["--references", shared] if flag == "--references" else [
        "--references", image_folder(tmp_path / "refs", ["cat", "dog"])]
    extra = [] if flag == "--references" else [flag, shared]
    result = run_adapt(command, *references, "--out", shared, *extra, "--overwrite",
                       "--device", "cpu")
    assert_refused(result, flag, "output folder", "--out")
    assert snapshot(shared) == before


def _spy_training(monkeypatch, tmp_path):
    """Replace synthesize/personalize/finetune by recorders; return what they received."""
    import adapt.finetune
    import adapt.personalize
    import adapt.synthesize
    from tests.tiny_classifiers import write_reference_set

    seen = {}

    def synthesize(classes, out, **kwargs):
        seen["synthesize"] = kwargs
        return write_reference_set(out, list(classes))

    def train(name):
        def run(config, progress=True):
            seen[name] = config
            Path(config.out).mkdir(parents=True, exist_ok=True)
            return Path(config.out)
        return run

    monkeypatch.setattr(adapt.synthesize, "synthesize", synthesize)
    monkeypatch.setattr(adapt.personalize, "personalize", train("personalize"))
    monkeypatch.setattr(adapt.finetune, "finetune", train("finetune"))
    return seen


def test_personalize_and_finetune_pass_variant_batches_checkpoints_and_resolution(
    tmp_path, monkeypatch
):
    seen = _spy_training(monkeypatch, tmp_path)
    references = image_folder(tmp_path / "refs", ["cat", "dog"])
    result = run_adapt("personalize", "--references", references, "--out", tmp_path / "lora",
                       "--variant", "fp16", "--batch-size", "6", "--grad-accum", "4",
                       "--keep-checkpoints", "3", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    config = seen["personalize"]
    assert (config.variant, config.batch_size, config.grad_accum) == ("fp16", 6, 4)
    assert config.keep_checkpoints == 3 and config.resolution == 224  # the evaluation size
    result = run_adapt("finetune", "--references", references, "--out", tmp_path / "clf",
                       "--lora", tmp_path / "lora", "--variant", "fp16", "--grad-accum", "2",
                       "--resolution", "96", "--text-batch-size", "64", "--device", "cpu",
                       "--quiet")
    assert result.exit_code == 0, result.output
    config = seen["finetune"]
    assert (config.variant, config.grad_accum, config.resolution) == ("fp16", 2, 96)
    assert config.text_batch_size == 64
    assert config.prompt is None and config.token is None  # the LoRA's recorded ones


@pytest.mark.parametrize(
    ("args", "resolution"),
    [(["--labels", "LABELS"], 224), (["--dataset", "stl10"], 96),
     (["--labels", "LABELS", "--resolution", "64"], 64)],
    ids=["default", "stl10", "given"],
)
def test_adapt_run_threads_variant_and_trains_at_the_evaluation_resolution(
    tmp_path, monkeypatch, labels, args, resolution
):
    seen = _spy_training(monkeypatch, tmp_path)
    args = [str(labels("cat\ndog\n")) if a == "LABELS" else a for a in args]
    result = run_adapt("run", *args, "--out", tmp_path / "run", "--variant", "fp16",
                       "--synthesis-batch", "4", "--grad-accum", "4", "--batch-size", "6",
                       "--finetune-grad-accum", "2", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    synthesis = seen["synthesize"]
    assert synthesis["variant"] == "fp16" and synthesis["batch_size"] == 4
    assert synthesis["resolution"] is None  # the cascade's own 256; trainings resize
    personalized, finetuned = seen["personalize"], seen["finetune"]
    assert personalized.variant == finetuned.variant == "fp16"
    assert personalized.resolution == finetuned.resolution == resolution
    assert (personalized.batch_size, personalized.grad_accum, finetuned.grad_accum) == (6, 4, 2)


def test_adapt_run_under_the_protocol_trains_as_the_papers_code(tmp_path, monkeypatch):
    seen = _spy_training(monkeypatch, tmp_path)
    result = run_adapt("run", "--dataset", "stl10", "--protocol", "choi2024", "--out",
                       tmp_path / "run", "--k", "0", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    # the paper's one CLIP template for STL-10, and the IF-II prompt of its evaluation
    assert seen["finetune"].templates == ["This is a photo of a {}"]
    assert seen["personalize"].prompt == seen["finetune"].prompt == "This is a photo of a {}."
    assert seen["personalize"].k == 0
    command = (tmp_path / "run" / "certify_command.txt").read_text()
    assert "--protocol choi2024" in command and "--k 0" in command


def test_adapt_run_protocol_refusals(tmp_path, labels):
    no_dataset = run_adapt("run", "--labels", labels("cat\ndog\n"), "--protocol", "choi2024",
                           "--out", tmp_path / "a")
    assert no_dataset.exit_code == 2 and "needs --dataset" in no_dataset.output
    other_prompt = run_adapt("run", "--dataset", "stl10", "--protocol", "choi2024",
                             "--prompt", "art of {}", "--out", tmp_path / "b")
    assert other_prompt.exit_code == 2 and "differs from --protocol" in other_prompt.output
    uncovered = run_adapt("run", "--dataset", "cifar10", "--protocol", "choi2024",
                          "--out", tmp_path / "c")
    assert uncovered.exit_code == 2 and "does not cover" in uncovered.output
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.mark.parametrize("command", ["synthesize", "run"])
def test_synthesize_and_run_are_refused_under_a_launcher(labels, tmp_path, monkeypatch, command):
    # every process of a launcher would write the same reference images
    import cli.adapt

    monkeypatch.setenv("WORLD_SIZE", "2")
    kept = []  # in a launcher's process: exit status 2 whatever comes (not in pytest's)
    monkeypatch.setattr(cli.adapt, "_keep_refusal_status", lambda: kept.append(True))
    out = tmp_path / "out"
    result = run_adapt(command, "--labels", labels("dog\ncat\n"), "--out", out, "--device", "cpu")
    assert_refused(result, f"adapt {command} runs in one process", "2 processes",
                   "adapt personalize")
    assert kept and not out.exists()
