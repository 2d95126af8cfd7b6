"""Inputs that must not break a run: each gets one clear message (exit 2) or is handled right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import classifiers
from classifiers.datasets import UnreadableImageError
from cli.main import certify_command
from tests.cli_helpers import invoke, rows, sidecar


def _folder(tmp_path, files: dict[str, bytes | np.ndarray]):
    """An ImageFolder tree tmp_path/images/<class>/<name> from arrays (saved as PNG) or bytes."""
    root = tmp_path / "images"
    for relative, content in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            Image.fromarray(content).save(target)
    return root


def test_16bit_grayscale_png_scales_by_65535(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (256, 256), dtype=np.uint16)
    root = _folder(tmp_path, {"a/x.png": values})
    assert Image.open(root / "a" / "x.png").mode.startswith("I;16")  # really a 16-bit file
    image, label = classifiers.build_dataset(f"folder:{root}")[0]
    assert label == 0 and image.shape == (3, 224, 224)
    # 256x256 is already the resize target: the center crop keeps pixels 16..239 as they are.
    expected = torch.from_numpy(values[16:240, 16:240].astype(np.float64) / 65535)
    for channel in image:
        assert torch.allclose(channel.double(), expected, atol=1 / 65535, rtol=0)
    assert (image < 1).float().mean() > 0.99  # not the all-white image of a clip at 255


def test_8bit_rgb_png_unchanged(tmp_path):
    values = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    root = _folder(tmp_path, {"a/x.png": values})
    image, _ = classifiers.build_dataset(f"folder:{root}")[0]
    expected = torch.from_numpy(values[16:240, 16:240].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.allclose(image, expected, atol=1e-6)


CONSTANT_MODEL = '''
import torch


class Constant(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.num_classes = num_classes

    def forward(self, images):
        logits = torch.zeros(images.shape[0], self.num_classes)
        logits[:, 0] = self.scale
        return logits


def build(num_classes):
    return Constant(num_classes)
'''

FAST = ["--n0", "10", "--n", "20", "--batch", "20", "--quiet"]


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_unreadable_image_names_the_file_and_keeps_earlier_rows(tmp_path, damage):
    good = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(good).save(tmp_path / "good.png")
    whole = (tmp_path / "good.png").read_bytes()
    broken = whole[: len(whole) // 2] if damage == "truncated" else b"not an image at all"
    root = _folder(tmp_path, {"a/0.png": good, "a/1.png": broken, "b/2.png": good})
    model = tmp_path / "models.py"
    model.write_text(CONSTANT_MODEL)
    out = tmp_path / "run"
    result = invoke(certify_command, *FAST, "--model", f"{model}:build",
                    "--dataset", f"folder:{root}", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"cannot read image {root / 'a' / '1.png'}" in result.output
    assert [row["idx"] for row in rows(out)] == ["0"]  # the row before it is kept
    with pytest.raises(UnreadableImageError) as raised:
        classifiers.build_dataset(f"folder:{root}")[1]
    assert raised.value.path == str(root / "a" / "1.png")


@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "hpu"])
def test_device_torch_lacks_is_one_message(tmp_path, device):
    result = invoke(certify_command, *FAST, "--max", "1", "--device", device,
                    "--out", str(tmp_path / "r"))
    assert result.exit_code == 2, result.output
    assert f"--device {device}" in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def _digits_weights_file() -> bytes:
    from classifiers.digits import weights_path

    return weights_path(0.25).read_bytes()


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda path: path.write_bytes(_digits_weights_file()[:5000]),
         "not a readable safetensors"),
        (lambda path: path.write_bytes(b"plain text, not weights"), "not a readable safetensors"),
        (lambda path: classifiers.save_classifier_weights(torch.nn.Linear(3, 2), path),
         "does not fit DigitsCNN"),
    ],
    ids=["truncated", "not-safetensors", "other-architecture"],
)
def test_bad_classifier_weights_are_one_message_naming_the_file(tmp_path, make, problem):
    weights = tmp_path / "w.safetensors"
    make(weights)
    out = tmp_path / "out" / "r"
    result = invoke(certify_command, *FAST, "--max", "1", "--classifier-weights", str(weights),
                    "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"{weights}" in result.output and problem in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


RGB_ONLY_MODEL = '''
import torch


def build(num_classes):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(num_classes)
    )
'''


def test_rgb_folder_for_a_greyscale_model_says_what_it_expects(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    root = _folder(tmp_path, {f"{digit}/x.png": rgb for digit in range(10)})
    out = tmp_path / "out" / "r"
    result = invoke(certify_command, *FAST, "--max", "1", "--dataset", f"folder:{root}",
                    "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "expects greyscale (1-channel) images" in result.output
    assert "RGB (3-channel)" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_greyscale_dataset_for_an_rgb_model_says_what_it_expects(tmp_path):
    model = tmp_path / "rgb_models.py"
    model.write_text(RGB_ONLY_MODEL)
    out = tmp_path / "out" / "r"
    result = invoke(certify_command, *FAST, "--max", "1", "--model", f"{model}:build",
                    "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "expects RGB (3-channel) images" in result.output
    assert "greyscale (1-channel) ones" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t" + b"9" * 300_000 + b"\t1\t0.1\n",
         "unreadable as tab-separated text"),
        (b"idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0.1\n\xff\xfe\x00\x81\n",
         "not UTF-8 text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x08\x06\x00\x00\x00\xff",
         "not UTF-8 text"),
        (b"idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\tx" + b"9" * 100_000 + b"\t1\t0\n",
         "non-numeric value"),
    ],
    ids=["huge-field", "non-utf8-row", "binary", "long-non-number"],
)
def test_analyze_unreadable_file_names_it_in_one_short_message(tmp_path, content, problem):
    from cli.analyze import analyze_command

    path = tmp_path / "results.tsv"
    path.write_bytes(content)
    result = invoke(analyze_command, str(path))
    assert result.exit_code == 2, result.output
    assert str(path) in result.output and problem in result.output
    assert "Traceback" not in result.output
    assert len(result.output) < 600  # the megabyte field is not echoed back


@pytest.mark.parametrize("where", ["under-a-file", "a-folder"])
def test_denoise_unwritable_out_is_refused_before_any_work(tmp_path, monkeypatch, where):
    import cli.denoise

    def no_work(*args, **kwargs):
        raise AssertionError("a denoiser was built for an --out that cannot be written")

    monkeypatch.setattr(cli.denoise, "build_denoiser", no_work)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder.png").mkdir()
    # root ignores permissions: a path under a regular file is unwritable for everyone
    out = tmp_path / ("file/sub/grid.png" if where == "under-a-file" else "folder.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke(cli.denoise.denoise_command, "--out", str(out), "--overwrite")
    assert result.exit_code == 2, result.output
    assert str(out) in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file").read_text() == "mine"


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, monkeypatch):
    import cli.main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.main, "_build_model", interrupted)
    result = invoke(certify_command, *FAST, "--out", str(tmp_path / "out" / "r"))
    assert result.exit_code == 130, result.output
    assert "interrupted during start-up: nothing was written" in result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
    assert not (tmp_path / "out").exists()


def test_skip_unreadable_records_the_file_and_a_rerun_skips_it_again(tmp_path):

    good = np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    # the unreadable file is the first one: the start-up checks must take the next image
    root = _folder(tmp_path, {"a/0.png": b"junk", "a/1.png": good, "b/2.png": good})
    model = tmp_path / "models.py"
    model.write_text(CONSTANT_MODEL)
    out = tmp_path / "run"
    args = [*FAST, "--model", f"{model}:build", "--dataset", f"folder:{root}",
            "--out", str(out), "--skip-unreadable"]

    def indices() -> list[str]:
        return [row["idx"] for row in rows(out)]

    def skipped() -> dict:
        return sidecar(out).get("skipped", {})

    for _ in range(2):  # the rerun resumes: it skips the file again, the same way
        result = invoke(certify_command, *args)
        assert result.exit_code == 0, result.output
        assert indices() == ["1", "2"]
        assert list(skipped()) == ["0"]
        assert skipped()["0"].startswith(f"cannot read image {root / 'a' / '0.png'}")
    assert "skipped 1 unreadable image" in result.output

    Image.fromarray(good).save(root / "a" / "0.png")  # repaired: its row comes, no longer skipped
    result = invoke(certify_command, *args)
    assert result.exit_code == 0, result.output
    assert sorted(indices()) == ["0", "1", "2"] and skipped() == {}


def test_class_folder_benchmarks_read_16bit_images_too(tmp_path):
    from classifiers.datasets import ISIC_CODES

    values = np.full((256, 256), 30000, dtype=np.uint16)
    for code in ISIC_CODES:
        (tmp_path / "isic2018" / code).mkdir(parents=True)
        Image.fromarray(values).save(tmp_path / "isic2018" / code / "x.png")
    image, _ = classifiers.build_dataset("isic", data_root=str(tmp_path))[0]
    assert torch.allclose(image.double(), torch.full(image.shape, 30000 / 65535,
                                                     dtype=torch.float64), atol=1 / 65535)


def _png_48bit(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand: PIL cannot write one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    height, width, _ = values.shape
    big_endian = values.astype(">u2")
    scanlines = b"".join(b"\x00" + big_endian[row].tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b""))


def test_16bit_rgb_png_keeps_its_values(tmp_path):
    values = np.random.default_rng(5).integers(0, 65536, (256, 256, 3), dtype=np.uint16)
    root = _folder(tmp_path, {"a/x.png": _png_48bit(values)})
    image, _ = classifiers.build_dataset(f"folder:{root}")[0]
    expected = torch.from_numpy(values[16:240, 16:240].astype(np.float64) / 65535)
    # PIL keeps the high byte of each 16-bit value: within 1/255 of value / 65535
    assert torch.allclose(image.double(), expected.permute(2, 0, 1), atol=1 / 255, rtol=0)


def test_float_tiff_is_refused_not_clipped(tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)).save(root / "a" / "x.tif")
    assert Image.open(root / "a" / "x.tif").mode == "F"
    with pytest.raises(UnreadableImageError, match=r"^cannot read image \S+x\.tif: 32-bit float"):
        classifiers.build_dataset(f"folder:{root}")[0]


def test_predict_skip_unreadable_records_the_file_and_goes_on(tmp_path):

    from cli.main import predict_command

    good = np.random.default_rng(5).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    root = _folder(tmp_path, {"a/0.png": good, "a/1.png": b"\x89PNG truncated", "b/2.png": good})
    model = tmp_path / "models.py"
    model.write_text(CONSTANT_MODEL)
    args = ["--n", "20", "--batch", "20", "--quiet", "--model", f"{model}:build",
            "--dataset", f"folder:{root}", "--out", str(tmp_path / "run")]
    refused = invoke(predict_command, *args)
    assert refused.exit_code == 2 and str(root / "a" / "1.png") in refused.output
    result = invoke(predict_command, *args, "--skip-unreadable")
    assert result.exit_code == 0, result.output
    assert [r["idx"] for r in rows(tmp_path / "run")] == ["0", "2"]
    skipped = sidecar(tmp_path / "run")["skipped"]
    assert list(skipped) == ["1"] and str(root / "a" / "1.png") in skipped["1"]


def test_denoise_skip_unreadable_draws_the_other_images(tmp_path, monkeypatch):
    import cli.denoise

    class Identity(torch.nn.Module):  # the test is about the images, not the denoiser
        def forward(self, noisy, sigma):
            return noisy

        def at(self, sigma):
            return self

    drawn = []
    monkeypatch.setattr(cli.denoise, "build_denoiser", lambda *args: Identity())
    monkeypatch.setattr(cli.denoise, "_draw", lambda columns, out: drawn.append(columns))
    good = np.random.default_rng(6).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    root = _folder(tmp_path, {"a/0.png": b"junk", "a/1.png": good, "b/2.png": good})
    args = ["--dataset", f"folder:{root}", "--indices", "0,1,2", "--sigmas", "0.5",
            "--denoiser", "ffdnet", "--out", str(tmp_path / "grid.png")]
    refused = invoke(cli.denoise.denoise_command, *args)
    assert refused.exit_code == 2 and str(root / "a" / "0.png") in refused.output
    assert not drawn
    result = invoke(cli.denoise.denoise_command, *args, "--skip-unreadable")
    assert result.exit_code == 0, result.output
    assert f"skipped index 0: cannot read image {root / 'a' / '0.png'}" in result.output
    (columns,) = drawn
    assert [title for title, _ in columns] == ["clean", "noisy σ=0.5", "ffdnet σ=0.5"]
    clean = columns[0][1]
    assert clean.shape[0] == 2  # images 1 and 2
    assert torch.equal(clean[0], clean[1])  # both are `good`
    only_junk = [*args[:3], "0", *args[4:], "--skip-unreadable"]
    none_left = invoke(cli.denoise.denoise_command, *only_junk)
    assert none_left.exit_code == 2 and "could be read" in none_left.output
