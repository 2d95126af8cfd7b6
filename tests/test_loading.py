"""Loading checkpoints in the layouts they are published in, offline.

- DeepFloyd IF's slow T5 tokenizer (`tokenizer/spiece.model`, no tokenizer.json), read
  through transformers with sentencepiece + protobuf; an unreadable one is one clear error.
- Weight variants (`*.fp16.safetensors` only, as DeepFloyd publishes): `variant="fp16"`
  / `--variant fp16` loads them; a variant the folder does not hold is one clear error.
- `dds` from a UNet2DModel at the repository root (google/ddpm-cifar10-32), by folder and
  by hub id from a Hugging Face cache laid out here.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from PIL import Image

import cli.denoise
import denoisers
from cli.denoise import denoise_command
from cli.main import certify_command
from denoisers import DENOISERS
from denoisers.if2 import load_if2
from denoisers.registry import (
    CheckpointError,
    CheckpointNotFoundError,
    UnreadableCheckpointError,
    weight_variants,
)
from tests.cli_helpers import invoke, sidecar
from tests.tiny_models import (
    go_offline,
    one_thread,
    save_tiny_ddpm,
    save_tiny_if1,
    save_tiny_if2,
    save_to_hub_cache,
    tiny_ddpm_unet,
    tiny_if2_pipeline,
)

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

SIGMA = 0.25
PROMPT_TOKENS = 77  # IF's encode_prompt pads and truncates to 77 tokens


def noisy_batch(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand(shape, generator=generator)
    return clean + SIGMA * torch.randn(shape, generator=generator)


def rounded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights as an fp16 file holds them, read back in fp32."""
    return {name: tensor.half().float() for name, tensor in state.items()}


def assert_same_weights(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name].float(), tensor), name


@pytest.fixture(scope="module")
def if2_dir(tmp_path_factory):
    return save_tiny_if2(tmp_path_factory.mktemp("if2"))


@pytest.fixture(scope="module")
def if2_fp16_dir(tmp_path_factory):
    # As DeepFloyd's repositories: fp16 files only, the T5 weights in shards.
    folder = tmp_path_factory.mktemp("if2_fp16")
    return save_tiny_if2(folder, variant="fp16", text_encoder_shard_size="2KB")


@pytest.fixture
def broken_tokenizer_dir(if2_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(if2_dir, folder)
    (folder / "tokenizer" / "spiece.model").write_bytes(b"\x08not a sentencepiece model")
    return folder


# ------------------------------------------------------------------- slow T5 tokenizer


def test_tiny_if_checkpoints_have_the_hubs_tokenizer_layout(if2_dir, tmp_path):
    for folder in (if2_dir, save_tiny_if1(tmp_path / "if1")):
        tokenizer = folder / "tokenizer"
        assert (tokenizer / "spiece.model").is_file()
        assert not (tokenizer / "tokenizer.json").exists()
        config = json.loads((tokenizer / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "T5Tokenizer"
        index = json.loads((folder / "model_index.json").read_text())
        assert index["tokenizer"] == ["transformers", "T5Tokenizer"]


def test_slow_tokenizer_token_ids_reach_the_encoder(if2_dir):
    import sentencepiece
    from transformers import T5EncoderModel

    text = "this is a photo of a sks."
    parts = load_if2(if2_dir, prompt="this is a photo of a {}.", token="sks")
    # The known answer: sentencepiece's own ids for the file (+ </s> = 1, T5's <pad> = 0),
    # through the saved encoder.
    pieces = sentencepiece.SentencePieceProcessor(
        model_file=str(if2_dir / "tokenizer" / "spiece.model")
    )
    ids = pieces.encode(text) + [1]
    assert pieces.unk_id() not in ids and len(ids) > 5
    input_ids = torch.tensor([ids + [0] * (PROMPT_TOKENS - len(ids))])
    mask = (torch.arange(PROMPT_TOKENS) < len(ids)).long()[None]
    encoder = T5EncoderModel.from_pretrained(if2_dir / "text_encoder").eval()
    with torch.no_grad():
        expected = encoder(input_ids, attention_mask=mask)[0]
    torch.testing.assert_close(parts.prompt_embeds, expected)
    # ... and the comparison sees the words: another token, other embeddings
    other = load_if2(if2_dir, prompt="this is a photo of a {}.", token="dog")
    assert (other.prompt_embeds - parts.prompt_embeds).abs().max() > 1e-3


def test_corrupt_spiece_model_is_one_clear_error(broken_tokenizer_dir):
    with pytest.raises(UnreadableCheckpointError) as info:
        DENOISERS.build("if2", sigma=SIGMA, checkpoint=str(broken_tokenizer_dir))
    message = str(info.value)
    assert "IF-II model: the tokenizer in" in message
    assert "tokenizer/spiece.model is not a sentencepiece model" in message
    assert "download it again" in message
    assert "tiktoken" not in message


def test_missing_protobuf_is_named_instead_of_tiktoken(if2_dir, monkeypatch):
    # What a machine without protobuf sees: sentencepiece's protobuf module cannot be
    # imported, and transformers falls back to a tiktoken reader.
    import sentencepiece

    monkeypatch.delattr(sentencepiece, "sentencepiece_model_pb2", raising=False)
    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    with pytest.raises(UnreadableCheckpointError) as info:
        DENOISERS.build("if2", sigma=SIGMA, checkpoint=str(if2_dir))
    message = str(info.value)
    assert "protobuf is not installed here" in message
    assert "pip install 'robustify[models]'" in message
    assert "tiktoken" not in message


# ------------------------------------------------------------------------- variants


def test_weight_variants_reads_sharded_and_plain_names(tmp_path):
    names = [
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/model.fp16-00002-of-00002.safetensors",
        "text_encoder/model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model-00001-of-00003.bf16.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/config.json",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert weight_variants(tmp_path) == {
        "fp16": [names[0], names[1], names[3]],
        None: [names[2], names[5]],
        "bf16": [names[4]],
    }


def test_variant_only_ddpm_loads_the_fp16_weights(tmp_path):
    folder = save_tiny_ddpm(tmp_path / "ddpm", variant="fp16")
    assert set(weight_variants(folder)) == {"fp16"}  # no fp32 file to fall back on
    denoiser = DENOISERS.build("dds", sigma=SIGMA, checkpoint=str(folder), variant="fp16")
    assert denoiser.unet.dtype == torch.float32  # cast to the asked dtype
    original = tiny_ddpm_unet(seed=0).state_dict()
    assert_same_weights(denoiser.unet.state_dict(), rounded(original))
    assert any(not torch.equal(t, t.half().float()) for t in original.values())
    assert denoiser.settings()["variant"] == "fp16"


def test_variant_only_if2_loads_the_fp16_unet_and_text_encoder(if2_fp16_dir):
    assert set(weight_variants(if2_fp16_dir)) == {"fp16"}
    assert (if2_fp16_dir / "text_encoder" / "model.safetensors.index.fp16.json").is_file()
    assert len(weight_variants(if2_fp16_dir / "text_encoder")["fp16"]) > 1
    denoiser = DENOISERS.build("if2", sigma=SIGMA, checkpoint=str(if2_fp16_dir), variant="fp16")
    pipeline = tiny_if2_pipeline(seed=0)
    assert_same_weights(denoiser.unet.state_dict(), rounded(pipeline.unet.state_dict()))
    # The prompt embedding comes from the fp16 file's T5 weights too.
    pipeline.text_encoder.load_state_dict(rounded(pipeline.text_encoder.state_dict()))
    with torch.no_grad():
        embeds, _ = pipeline.encode_prompt("", do_classifier_free_guidance=False)
    torch.testing.assert_close(denoiser.prompt_embeds, embeds)
    assert denoiser.settings()["variant"] == "fp16"


@pytest.mark.parametrize("name", ["dds", "if2"])
def test_variant_only_folder_without_variant_says_which_to_pass(name, tmp_path):
    if name == "dds":
        folder = save_tiny_ddpm(tmp_path / name, variant="fp16")
    else:
        folder = save_tiny_if2(tmp_path / name, variant="fp16")
    with pytest.raises(UnreadableCheckpointError) as info:
        DENOISERS.build(name, sigma=SIGMA, checkpoint=str(folder))
    message = str(info.value)
    assert str(folder) in message
    assert "holds only 'fp16' variant weights" in message and "--variant fp16" in message


@pytest.mark.parametrize("name", ["dds", "if2"])
def test_variant_the_folder_lacks_is_one_clear_error(name, tmp_path, if2_dir):
    folder = save_tiny_ddpm(tmp_path / name) if name == "dds" else if2_dir
    with pytest.raises(UnreadableCheckpointError) as info:
        DENOISERS.build(name, sigma=SIGMA, checkpoint=str(folder), variant="fp16")
    message = str(info.value)
    assert "has no 'fp16' variant weights" in message and "plain weights" in message


def test_cached_variant_only_repository_without_variant_says_which_to_pass(
    if2_fp16_dir, tmp_path, monkeypatch
):
    cache = tmp_path / "hub"
    save_to_hub_cache(cache, "DeepFloyd/IF-II-L-v1.0", if2_fp16_dir)
    go_offline(monkeypatch, cache)
    with pytest.raises(UnreadableCheckpointError) as info:
        DENOISERS.build("if2", sigma=SIGMA)
    message = str(info.value)
    assert "'DeepFloyd/IF-II-L-v1.0' (cached in" in message
    assert "--variant fp16" in message and "offline" not in message


def test_pickled_weights_only_are_named(tmp_path):
    folder = save_tiny_ddpm(tmp_path / "ddpm")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # as old repositories ship them
    with pytest.raises(UnreadableCheckpointError, match=r"only pickled PyTorch weights"):
        DENOISERS.build("dds", sigma=SIGMA, checkpoint=str(folder))


# --------------------------------------------------------------------- dds layouts


@pytest.fixture(scope="module")
def root_ddpm(tmp_path_factory):
    # IF's squared-cosine schedule, not the default linear one: the known timestep below
    # (289 at sigma 0.25, DESIGN.md) shows the root's scheduler_config.json was read.
    folder = tmp_path_factory.mktemp("ddpm-root")
    return save_tiny_ddpm(folder, layout="root", beta_schedule="squaredcos_cap_v2")


def test_root_layout_ddpm_loads_from_a_folder(root_ddpm, tmp_path):
    assert (root_ddpm / "config.json").is_file() and not (root_ddpm / "unet").exists()
    denoiser = DENOISERS.build("dds", sigma=SIGMA, checkpoint=str(root_ddpm))
    assert_same_weights(denoiser.unet.state_dict(), tiny_ddpm_unet(seed=0).state_dict())
    assert denoiser.timestep == 289
    # the same model in the DDPMPipeline layout denoises identically
    pipeline_dir = save_tiny_ddpm(tmp_path / "pipeline", beta_schedule="squaredcos_cap_v2")
    same = DENOISERS.build("dds", sigma=SIGMA, checkpoint=str(pipeline_dir))
    noisy = noisy_batch((2, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(denoiser(noisy, SIGMA), same(noisy, SIGMA))


def test_root_layout_ddpm_loads_by_hub_id_offline(root_ddpm, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    save_to_hub_cache(cache, "google/ddpm-cifar10-32", root_ddpm)
    go_offline(monkeypatch, cache)
    denoiser = DENOISERS.build("dds", sigma=SIGMA, checkpoint="google/ddpm-cifar10-32")
    assert_same_weights(denoiser.unet.state_dict(), tiny_ddpm_unet(seed=0).state_dict())
    assert denoiser.timestep == 289
    assert denoiser.settings()["checkpoint"] == "google/ddpm-cifar10-32"


def test_repository_without_a_known_layout_is_not_called_offline(monkeypatch):
    # Online, the Hub answers "no such file" for both layouts' configs.
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    asked = []

    def no_such_file(repo_id, filename, **kwargs):
        asked.append(filename)
        raise EntryNotFoundError(f"{filename} not in {repo_id}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_such_file)
    with pytest.raises(UnreadableCheckpointError) as info:
        DENOISERS.build("dds", sigma=SIGMA, checkpoint="someone/not-a-ddpm")
    message = str(info.value)
    assert asked == ["unet/config.json", "config.json"]
    assert "has none of unet/config.json, config.json" in message
    assert "offline" not in message and "cache" not in message


def test_root_layout_without_scheduler_config_is_one_clear_error(root_ddpm, tmp_path):
    folder = tmp_path / "no-scheduler"
    shutil.copytree(root_ddpm, folder)
    (folder / "scheduler_config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="none of scheduler/scheduler_config.json"):
        DENOISERS.build("dds", sigma=SIGMA, checkpoint=str(folder))


# ----------------------------------------------------------------- command line


def certify_args(out, *extra):
    return ["--n0", "8", "--n", "16", "--batch", "16", "--max", "2", "--quiet",
            "--denoiser", "dds", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def digits_ddpm_fp16(tmp_path_factory):
    """The bundled digits DDPM as DeepFloyd publishes weights: fp16 variant files only."""
    from diffusers import DDPMPipeline

    folder = tmp_path_factory.mktemp("digits_fp16")
    pipeline = DDPMPipeline.from_pretrained(denoisers.BUNDLED_DIGITS_DDPM, use_safetensors=True)
    pipeline.unet.half()
    pipeline.save_pretrained(folder, safe_serialization=True, variant="fp16")
    return folder


def test_certify_with_variant_records_it(digits_ddpm_fp16, tmp_path):
    out = tmp_path / "run"
    result = invoke(certify_command, *certify_args(
        out, "--denoiser-checkpoint", str(digits_ddpm_fp16), "--variant", "fp16"),
        catch_exceptions=True)
    assert result.exit_code == 0, result.output
    denoiser = sidecar(out)["settings"]["denoiser"]
    assert (denoiser["variant"], denoiser["dtype"]) == ("fp16", "fp32")
    assert denoiser["checkpoint"] == str(digits_ddpm_fp16)
    assert len(out.with_suffix(".tsv").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--variant fp16"),
        (["--variant", "bf16"], "has no 'bf16' variant weights"),
        (["--variant", "../fp16"], "expected a word such as fp16"),
    ],
)
def test_certify_refuses_unreadable_variants_and_writes_nothing(
    digits_ddpm_fp16, tmp_path, extra, message
):
    out = tmp_path / "run"
    result = invoke(certify_command,
                    *certify_args(out, "--denoiser-checkpoint", str(digits_ddpm_fp16), *extra),
                    catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


def test_variant_without_a_denoiser_is_refused(tmp_path):
    result = invoke(certify_command, "--variant", "fp16", "--out", str(tmp_path / "run"),
                    catch_exceptions=True)
    assert result.exit_code == 2 and "--variant need --denoiser" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "a.png")
    return tmp_path / "images"


def test_denoise_reads_deepfloyds_layout_by_hub_id_offline(
    if2_fp16_dir, image_folder, tmp_path, monkeypatch
):
    # DeepFloyd/IF-II-L-v1.0 as a user's cache holds it after `hf download`: slow
    # tokenizer, fp16 weights only; the command's default checkpoint.
    cache = tmp_path / "hub"
    save_to_hub_cache(cache, "DeepFloyd/IF-II-L-v1.0", if2_fp16_dir)
    go_offline(monkeypatch, cache)
    columns = []
    monkeypatch.setattr(cli.denoise, "_draw", lambda cols, out: columns.extend(cols))
    result = invoke(denoise_command, "--dataset", f"folder:{image_folder}", "--indices", "0",
                    "--sigmas", str(SIGMA), "--denoiser", "if2", "--variant", "fp16",
                    "--out", str(tmp_path / "grid.png"), catch_exceptions=True)
    assert result.exit_code == 0, result.output
    title, denoised = columns[2]
    assert title == f"if2 σ={SIGMA:g} k=1.8"
    # what the same files give through the library from the folder
    noisy = columns[1][1]
    direct = DENOISERS.build("if2", sigma=SIGMA, checkpoint=str(if2_fp16_dir), variant="fp16")
    with torch.no_grad():
        torch.testing.assert_close(denoised, direct(noisy, SIGMA))


def test_denoise_with_a_corrupt_tokenizer_exits_2_and_draws_nothing(
    broken_tokenizer_dir, image_folder, tmp_path
):
    out = tmp_path / "grid.png"
    result = invoke(denoise_command, "--dataset", f"folder:{image_folder}", "--indices", "0",
                    "--sigmas", str(SIGMA), "--denoiser", "if2",
                    "--denoiser-checkpoint", str(broken_tokenizer_dir), "--out", str(out),
                    catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert "spiece.model is not a sentencepiece model" in result.output
    assert not out.exists()


# --------------------------------------------------------------- adapt synthesize


@pytest.mark.slow
def test_synthesize_reads_fp16_variants_and_slow_tokenizers(tmp_path):
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    from adapt.synthesize import synthesize

    fast = {"steps1": 2, "steps2": 2, "resolution": 32, "progress": False}
    stage1 = save_tiny_if1(tmp_path / "if1_fp16", variant="fp16")
    stage2 = save_tiny_if2(tmp_path / "if2_fp16", variant="fp16")
    made = synthesize(["dog"], tmp_path / "fp16", stage1=str(stage1), stage2=str(stage2),
                      variant="fp16", **fast)
    assert json.loads((made / "manifest.json").read_text())["settings"]["variant"] == "fp16"
    # The known answer: the same fp16-rounded weights as plain fp32 files.
    plain = {}
    for name, folder, cls in (("1", stage1, IFPipeline), ("2", stage2, IFSuperResolutionPipeline)):
        pipeline = cls.from_pretrained(folder, variant="fp16", dtype=torch.float32)
        plain[name] = tmp_path / f"if{name}_plain"
        pipeline.save_pretrained(plain[name], safe_serialization=True)
    again = synthesize(["dog"], tmp_path / "plain", stage1=str(plain["1"]),
                       stage2=str(plain["2"]), **fast)
    import numpy as np

    image = "images/0000/00.png"
    with Image.open(made / image) as first, Image.open(again / image) as second:
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_synthesize_with_a_corrupt_tokenizer_writes_nothing(broken_tokenizer_dir, tmp_path):
    from adapt.synthesize import synthesize

    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="IF-I model .*spiece.model is not a sentencepiece"):
        synthesize(["dog"], out, stage1=str(broken_tokenizer_dir), stage2=str(broken_tokenizer_dir),
                   progress=False)
    assert not out.exists()
