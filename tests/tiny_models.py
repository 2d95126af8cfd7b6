"""Tiny checkpoints of the real model classes, for offline tests.

Each builder makes a randomly initialised model of the same diffusers/transformers
class a real checkpoint uses, saves it with `save_pretrained` (safetensors) into a
directory and returns that directory, so tests load it back through the same
`from_pretrained` code path a user takes with a hub id. Seeds are fixed: the same
call gives the same weights.

- `save_tiny_ddpm(dir, ...)`: a `DDPMPipeline`-style directory (`unet/` holds a
  `UNet2DModel`, `scheduler/` a `DDPMScheduler`), or with `layout="root"` the UNet at
  the root beside `scheduler_config.json` (google/ddpm-cifar10-32's layout).
- `save_tiny_if2(dir, ...)` / `save_tiny_if1(dir, ...)`: an `IFSuperResolutionPipeline`
  with DeepFloyd IF-II's structure (6 input/output channels, `class_embed_type=
  "timestep"`, `addition_embed_type="text"`, simple cross-attention blocks) / an
  `IFPipeline` with IF-I's, a tiny T5 encoder and, as on the hub, a slow T5 tokenizer
  (`tokenizer/spiece.model` of a sentencepiece model trained in memory, no
  tokenizer.json). `variant="fp16"` saves only `*.fp16.safetensors` weights.
- `save_to_hub_cache(cache, repo_id, dir)`: a saved folder laid out as a Hugging Face
  cache entry, to load by hub id offline.
- `add_random_lora(unet, ...)`: a peft LoRA adapter with non-zero weights (peft's
  default initialisation leaves the adapter a no-op, which would make a test of
  "LoRA changes the output" pass or fail for the wrong reason); `save_tiny_if2_lora`
  saves one with the pipeline's `save_lora_weights`.
- `go_offline(monkeypatch, cache_dir)`: no Hub network and an empty cache for one test.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Words the tiny tokenizer's sentencepiece model is trained on; other text falls back to
# the pieces it learned (letters) or <unk>.
_WORDS = ["a", "an", "the", "photo", "of", "this", "is", "sks", "dog", "cat", "type", "food"]

T5_DIM = 16  # d_model of the tiny T5 encoder = encoder_hid_dim of the tiny IF-II UNet
T5_EXTRA_IDS = 3  # sentinel tokens <extra_id_N> after the pieces (T5 and DeepFloyd: 100)


@functools.lru_cache(maxsize=1)
def tiny_spiece_model() -> bytes:
    """A unigram sentencepiece model (the bytes of a `spiece.model`) trained in memory,
    with T5's fixed ids: <pad>=0, </s>=1, <unk>=2 and no <s>."""
    import random

    import sentencepiece

    shuffler = random.Random(0)
    corpus = [" ".join(shuffler.sample(_WORDS, len(_WORDS))) for _ in range(200)]
    corpus.append(" ".join("abcdefghijklmnopqrstuvwxyz.,"))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=48,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def save_slow_t5_tokenizer(directory: str | Path) -> Path:
    """Write a slow T5 tokenizer as DeepFloyd's hub repositories hold it: `spiece.model`,
    `tokenizer_config.json` and `special_tokens_map.json`, no `tokenizer.json` (the files
    transformers 4.x's sentencepiece `T5Tokenizer.save_pretrained` wrote, which diffusers'
    `convert_if.py` used). transformers 5.x converts it on load with sentencepiece and
    protobuf."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(tiny_spiece_model())
    extras = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {
        "additional_special_tokens": extras,
        "extra_ids": T5_EXTRA_IDS,
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"additional_special_tokens": extras, **special}, indent=2)
    )
    return directory


def tiny_t5_tokenizer():
    """The tiny slow T5 tokenizer (`save_slow_t5_tokenizer`) loaded with `T5Tokenizer`."""
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as folder:
        return T5Tokenizer.from_pretrained(save_slow_t5_tokenizer(folder))


def _as_slow_tokenizer(pipeline_directory: Path) -> None:
    """Replace the `tokenizer/` that `save_pretrained` wrote (tokenizer.json) by the hub's
    slow layout of the same tokenizer."""
    folder = pipeline_directory / "tokenizer"
    shutil.rmtree(folder)
    save_slow_t5_tokenizer(folder)


def tiny_ddpm_unet(*, prediction_channels: int = 3, sample_size: int = 16, seed: int = 0):
    """A two-level `UNet2DModel`; `prediction_channels=6` mimics a learned-variance model."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=prediction_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def save_tiny_ddpm(
    directory: str | Path,
    *,
    prediction_type: str = "epsilon",
    prediction_channels: int = 3,
    beta_schedule: str = "linear",
    sample_size: int = 16,
    seed: int = 0,
    layout: str = "pipeline",
    variant: str | None = None,
) -> Path:
    """Save a tiny UNet2DModel + DDPMScheduler into `directory`; return it.

    `layout="pipeline"`: `directory/{unet,scheduler}` (+ model_index.json), what
    `DDPMPipeline.save_pretrained` writes. `layout="root"`: the UNet's config.json and
    weights at the root with scheduler_config.json beside them (google/ddpm-cifar10-32).
    `variant="fp16"`: only half-precision `*.fp16.safetensors` weight files, as
    DeepFloyd publishes them.
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    directory = Path(directory)
    unet = tiny_ddpm_unet(
        prediction_channels=prediction_channels, sample_size=sample_size, seed=seed
    )
    if variant is not None:
        unet = unet.half()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        variance_type="learned_range" if prediction_channels == 6 else "fixed_small",
    )
    if layout == "pipeline":
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(
            directory, safe_serialization=True, variant=variant
        )
    elif layout == "root":
        unet.save_pretrained(directory, safe_serialization=True, variant=variant)
        scheduler.save_pretrained(directory)
    else:
        raise ValueError(f"layout must be 'pipeline' or 'root', got {layout!r}")
    return directory


def tiny_if_unet(*, sample_size: int, in_channels: int, seed: int = 0, **config):
    """A tiny `UNet2DConditionModel` with DeepFloyd IF's structure: 6 output channels
    (noise + learned variance), simple cross-attention to T5 states, text added to the
    time embedding. IF-II takes 6 input channels (image + low-resolution condition) and
    `class_embed_type="timestep"` for the condition's noise level; IF-I takes 3."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=6,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32,  # its group norm has a fixed 32 groups
        encoder_hid_dim=T5_DIM,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        mid_block_scale_factor=1.414,
        time_embedding_act_fn="gelu",
        time_embedding_dim=16,
        **config,
    ).eval()


def tiny_if2_components(*, seed: int = 0) -> dict:
    """The components of a tiny `IFSuperResolutionPipeline` (no safety checker/watermarker)."""
    from diffusers import DDPMScheduler
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=T5_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    ).eval()
    unet = tiny_if_unet(sample_size=32, in_channels=6, seed=seed, class_embed_type="timestep")
    # IF-II's two schedulers share the squared-cosine schedule; the denoising one
    # predicts epsilon with a learned variance range.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )
    image_noising_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "unet": unet,
        "scheduler": scheduler,
        "image_noising_scheduler": image_noising_scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "watermarker": None,
    }


def tiny_if2_pipeline(*, seed: int = 0):
    """A tiny in-memory `IFSuperResolutionPipeline`."""
    from diffusers import IFSuperResolutionPipeline

    return IFSuperResolutionPipeline(
        **tiny_if2_components(seed=seed), requires_safety_checker=False
    )


def _save_if(
    pipeline,
    directory: str | Path,
    variant: str | None,
    tokenizer: str,
    text_encoder_shard_size: str | None,
) -> Path:
    """`save_pretrained` a tiny IF pipeline in DeepFloyd's hub layout (see `save_tiny_if2`)."""
    directory = Path(directory)
    if variant is not None:
        # Half-precision files, as DeepFloyd's *.fp16.safetensors; cast module by module
        # (the pipeline's .to(dtype) warns about modules it would keep in fp32).
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.half()
    pipeline.save_pretrained(directory, safe_serialization=True, variant=variant)
    if text_encoder_shard_size is not None:
        # The pipeline's save does not pass a shard size on to transformers.
        shutil.rmtree(directory / "text_encoder")
        pipeline.text_encoder.save_pretrained(
            directory / "text_encoder", variant=variant, max_shard_size=text_encoder_shard_size
        )
    if tokenizer == "slow":
        _as_slow_tokenizer(directory)
    elif tokenizer != "fast":
        raise ValueError(f"tokenizer must be 'slow' or 'fast', got {tokenizer!r}")
    return directory


def save_tiny_if2(
    directory: str | Path,
    *,
    seed: int = 0,
    variant: str | None = None,
    tokenizer: str = "slow",
    text_encoder_shard_size: str | None = None,
) -> Path:
    """Save a tiny IF-II pipeline with `save_pretrained` (safetensors); return the directory.

    As DeepFloyd's repositories: `tokenizer/` holds the slow T5 tokenizer (spiece.model,
    no tokenizer.json; `tokenizer="fast"` keeps the tokenizer.json transformers 5 writes),
    `variant="fp16"` writes only half-precision `*.fp16.safetensors` weights, and
    `text_encoder_shard_size` (e.g. "2KB") shards the T5 weights
    (model.fp16-0000i-of-0000n.safetensors + model.safetensors.index.fp16.json).
    """
    return _save_if(
        tiny_if2_pipeline(seed=seed), directory, variant, tokenizer, text_encoder_shard_size
    )


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def add_random_lora(unet: torch.nn.Module, *, rank: int = 4, seed: int = 0) -> None:
    """Attach a peft LoRA adapter with random (non-zero) weights to a UNet's attention."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False)
    )


def save_tiny_if2_lora(directory: str | Path, *, seed: int = 1) -> Path:
    """Save a random LoRA for the tiny IF-II UNet with the pipeline's `save_lora_weights`."""
    from diffusers import IFSuperResolutionPipeline
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    pipeline = tiny_if2_pipeline()
    add_random_lora(pipeline.unet, seed=seed)
    IFSuperResolutionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=get_peft_model_state_dict(pipeline.unet),
        safe_serialization=True,
    )
    return directory


def go_offline(monkeypatch, cache_dir: str | Path) -> None:
    """Make the Hugging Face Hub offline with an empty cache at `cache_dir`, for one test.

    huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at import, so the values
    it uses are patched as well as the environment.
    """
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache_dir))


def save_to_hub_cache(
    cache_dir: str | Path, repo_id: str, folder: str | Path, *, revision: str = "0" * 40
) -> Path:
    """Lay the files of `folder` into a Hugging Face cache at `cache_dir` as huggingface_hub
    does for a download of `repo_id` (models--OWNER--NAME/ with blobs/ named by content
    hash, snapshots/REVISION/ linking to them, refs/main naming the revision); return the
    snapshot folder. With `go_offline(monkeypatch, cache_dir)` a test then loads `repo_id`
    by its hub id, offline, through the same `from_pretrained` calls a user's cache meets.
    """
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(Path(folder).rglob("*")):
        if not file.is_file():
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def tiny_if1_components(*, seed: int = 0) -> dict:
    """The components of a tiny `IFPipeline` (DeepFloyd IF-I's structure: 3 input channels,
    6 output channels = noise + learned variance, T5 text cross-attention, no class
    embedding), sharing the tiny T5 encoder and tokenizer of `tiny_if2_components`."""
    from diffusers import DDPMScheduler

    components = tiny_if2_components(seed=seed)
    unet = tiny_if_unet(sample_size=16, in_channels=3, seed=seed)  # IF-I-XL: 64
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.5,
        prediction_type="epsilon",
        variance_type="learned_range",
    )
    components.update(unet=unet, scheduler=scheduler)
    del components["image_noising_scheduler"]
    return components


def save_tiny_if1(
    directory: str | Path,
    *,
    seed: int = 0,
    variant: str | None = None,
    tokenizer: str = "slow",
    text_encoder_shard_size: str | None = None,
) -> Path:
    """Save a tiny IF-I (`IFPipeline`) with `save_pretrained` (safetensors); return its folder.
    The keywords are those of `save_tiny_if2` (default: the hub's slow tokenizer)."""
    from diffusers import IFPipeline

    pipeline = IFPipeline(**tiny_if1_components(seed=seed), requires_safety_checker=False)
    return _save_if(pipeline, directory, variant, tokenizer, text_encoder_shard_size)


def one_thread():
    """A generator for a module-scoped fixture: torch on one thread, restored afterwards.

    The tiny models gain nothing from intra-op threads, and on a busy machine with few
    cores the threads of torch's pool wait on each other (a step of a few milliseconds
    then takes seconds).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
