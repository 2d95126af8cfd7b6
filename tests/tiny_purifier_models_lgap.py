"""Tiny checkpoints of LGAP's two models, for offline tests (see tests/tiny_models.py).

- `save_tiny_blip(dir)`: a `BlipForConditionalGeneration` built from a `BlipConfig`
  (tiny vision and text configs) and its `BlipProcessor` (a `BlipImageProcessor` and a
  `BertTokenizer` read from a vocabulary file written here: no hub), saved with
  `save_pretrained` (safetensors), the layout of Salesforce/blip-image-captioning-base.
- `save_tiny_sd(dir)`: a `StableDiffusionImg2ImgPipeline` of a tiny `UNet2DConditionModel`,
  `AutoencoderKL` (two blocks: latents at half the image size), `CLIPTextModel` and a
  `CLIPTokenizer` read from vocab.json + merges.txt written here, and the scheduler of
  Stable Diffusion v1.5 (`PNDMScheduler`, PLMS steps), saved with `save_pretrained`.

Both load back through `denoisers.purifiers.lgap`'s loaders, as a hub id would.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The tiny BERT vocabulary: special tokens, then the words the tests caption with.
BLIP_WORDS = ["a", "photo", "of", "the", "dog", "cat", "on", "with", "red", "car", "."]
BLIP_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
CLIP_WORDS = ["a", "photo", "of", "the", "dog", "cat", "on", "with", "red", "car", "."]
TEXT_DIM = 32  # hidden size of the tiny CLIP text encoder = the UNet's cross_attention_dim


def blip_tokenizer(directory: str | Path):
    """A `BertTokenizer` from a written vocab.txt, with BLIP's extra tokens ([DEC] as BOS)."""
    from transformers import BertTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(BLIP_SPECIALS + BLIP_WORDS) + "\n")
    tokenizer = BertTokenizer(str(vocab), model_max_length=32)
    # As BLIP's tokenizer: [DEC] starts a caption, [SEP] ends it.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def tiny_blip(tokenizer, *, seed: int = 0, image_size: int = 16):
    from transformers import BlipConfig, BlipForConditionalGeneration

    vocab_size = len(tokenizer)
    config = BlipConfig(
        vision_config={
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": image_size, "patch_size": 8,
        },
        text_config={
            "vocab_size": vocab_size, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "encoder_hidden_size": 16,
            "max_position_embeddings": 32,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(config).eval()


def save_tiny_blip(directory: str | Path, *, seed: int = 0, image_size: int = 16) -> Path:
    """Save a tiny BLIP captioner and its processor; return the folder."""
    from transformers import BlipImageProcessor, BlipProcessor

    directory = Path(directory)
    tokenizer = blip_tokenizer(directory / "_vocab")
    model = tiny_blip(tokenizer, seed=seed, image_size=image_size)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory


def clip_tokenizer(directory: str | Path):
    """A `CLIPTokenizer` from a written vocab.json and merges.txt (whole words, no merges
    beyond each word's own letters)."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # CLIP's byte-level BPE: a word's last symbol carries "</w>"; letters and their
    # end-of-word forms are in the vocabulary, and merges rebuild each word.
    tokens: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", "!"]:
        tokens.setdefault(token, len(tokens))
    letters = sorted({c for word in CLIP_WORDS for c in word})
    for letter in letters:
        tokens.setdefault(letter, len(tokens))
        tokens.setdefault(letter + "</w>", len(tokens))
    merges: list[str] = []
    for word in CLIP_WORDS:
        if len(word) == 1:
            continue
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in merges:
                merges.append(merge)
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            tokens.setdefault(symbols[0], len(tokens))
    (directory / "vocab.json").write_text(json.dumps(tokens))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=32,
        pad_token="!",
    )


def tiny_sd_components(directory: str | Path, *, seed: int = 0, dtype=torch.float32) -> dict:
    """The components of a tiny Stable Diffusion img2img pipeline (no safety checker)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(Path(directory) / "_clip_vocab")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    # Stable Diffusion v1.5's scheduler config (scheduler/scheduler_config.json there).
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
        set_alpha_to_one=False,
    )
    components = {
        "unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder,
        "tokenizer": tokenizer, "scheduler": scheduler,
    }
    for name in ("unet", "vae", "text_encoder"):
        components[name] = components[name].to(dtype)
    return components


def tiny_sd_pipeline(directory: str | Path, *, seed: int = 0, dtype=torch.float32):
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(
        **tiny_sd_components(directory, seed=seed, dtype=dtype),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_sd(directory: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny Stable Diffusion img2img pipeline (safetensors); return the folder."""
    directory = Path(directory)
    tiny_sd_pipeline(directory, seed=seed).save_pretrained(directory, safe_serialization=True)
    return directory
