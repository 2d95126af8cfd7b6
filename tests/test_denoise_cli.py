"""`denoise`: the clean / noisy / denoised picture grid."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import cli.denoise
from cli.denoise import denoise_command
from cli.options import build_denoiser
from tests.cli_helpers import invoke
from tests.tiny_models import save_tiny_if2, save_tiny_if2_lora


@pytest.fixture
def captured(monkeypatch):
    columns = []
    original = cli.denoise._draw

    def draw(cols, out):
        columns.extend(cols)
        original(cols, out)

    monkeypatch.setattr(cli.denoise, "_draw", draw)
    return columns


def test_dds_grid_on_digits(tmp_path, captured):
    out = tmp_path / "grid.png"
    result = invoke(denoise_command, "--indices", "0,5", "--sigmas", "0.25,0.5", "--out", str(out),
                    catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert [title for title, _ in captured] == [
        "clean", "noisy σ=0.25", "dds σ=0.25", "noisy σ=0.5", "dds σ=0.5"
    ]
    clean, noisy, denoised = (captured[i][1] for i in (0, 3, 4))
    assert clean.shape == noisy.shape == denoised.shape == (2, 1, 8, 8)
    assert 0 <= denoised.min() and denoised.max() <= 1
    # the noise really has the asked std, and the denoiser moves the image back toward clean
    assert (noisy - clean).std().item() == pytest.approx(0.5, rel=0.25)
    assert ((denoised - clean) ** 2).mean() < ((noisy - clean) ** 2).mean()
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > picture.height


def test_if2_grid_has_one_column_per_k(tmp_path, captured):
    checkpoint = save_tiny_if2(tmp_path / "if2")
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "a.png")
    result = invoke(denoise_command, "--dataset", f"folder:{tmp_path / 'images'}", "--indices", "0",
                    "--sigmas", "0.5", "--denoiser", "if2",
                    "--denoiser-checkpoint", str(checkpoint), "--k", "1,2",
                    "--out", str(tmp_path / "grid.png"), catch_exceptions=True)
    assert result.exit_code == 0, result.output
    titles = [title for title, _ in captured]
    assert titles == ["clean", "noisy σ=0.5", "if2 σ=0.5 k=1", "if2 σ=0.5 k=2"]
    # the correction factor changes the UNet's condition, hence the output
    assert not torch.equal(captured[2][1], captured[3][1])


def test_existing_picture_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "grid.png"
    out.write_bytes(b"mine")
    result = invoke(denoise_command, "--out", str(out), catch_exceptions=True)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert out.read_bytes() == b"mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "1,2"], "--k applies to --denoiser if2 only"),
        (["--sigmas", "0,0.5"], "--sigmas"),
        (["--indices", "100000"], "past the end"),
        (["--prompt", "a {}"], "if2 only"),
    ],
)
def test_bad_input(tmp_path, args, message):
    result = invoke(denoise_command, *args, "--out", str(tmp_path / "g.png"), catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "g.png").exists()


def test_certify_and_denoise_condition_on_the_lora_folders_prompt(tmp_path):
    checkpoint = save_tiny_if2(tmp_path / "if2")
    lora = save_tiny_if2_lora(tmp_path / "lora")
    record = {"certify": {"prompt": "a photo of a {}.", "token": "sks"}}
    (lora / "adapt_config.json").write_text(json.dumps(record))
    options = {
        "denoiser": "if2", "dtype": "fp32", "denoiser_checkpoint": str(checkpoint),
        "dataset": "folder:x", "variant": None, "lora": str(lora), "timestep_rounding": None,
        "prompt": None, "token": None,  # what --prompt/--token give when not passed
        "allow_untrained_sigma": False,
    }
    assert build_denoiser(options, 0.5, 1.8, "cpu").settings()["prompt"] == "a photo of a sks."
    given = {**options, "prompt": "this is a {}", "token": "dog"}
    assert build_denoiser(given, 0.5, 1.8, "cpu").settings()["prompt"] == "this is a dog"
    empty = {**options, "prompt": ""}
    assert build_denoiser(empty, 0.5, 1.8, "cpu").settings()["prompt"] == ""
