"""Tiny models of the real classes for CLIPure's tests.

- `save_tiny_prior(dir, ...)`: a diffusion-prior repository in Karlo's layout
  (kakaobrain/karlo-v1-alpha): `prior/` a diffusers `PriorTransformer` over 32-d
  embeddings (the tiny CLIP's, tests/test_clip.py) with non-zero `clip_mean`/`clip_std`
  (they start at zeros, which would divide by zero), `prior_scheduler/` an
  `UnCLIPScheduler` with Karlo's settings (x0 prediction, squaredcos_cap_v2),
  `text_encoder/` a transformers `CLIPTextModelWithProjection` and `tokenizer/` a
  `CLIPTokenizer` with a written character-level vocabulary (no merges), all written
  with save_pretrained (safetensors), to load back by path as a hub id loads.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

PRIOR_DIM = 32  # = embed_dim of the tiny CLIP
TEXT_LENGTH = 32  # tokenizer max length = the prior's num_embeddings


def write_char_clip_tokenizer(folder: Path) -> Path:
    """A CLIPTokenizer whose vocabulary is single characters (word-final ones with
    '</w>'), with no merges: every word is spelled out letter by letter."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + ".,'-!":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TEXT_LENGTH
    )
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_prior(
    directory: str | Path, *, seed: int = 0, prediction_type: str = "sample",
    embedding_dim: int = PRIOR_DIM, scheduler_folder: str = "prior_scheduler",
) -> Path:
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    directory = Path(directory)
    tokenizer_folder = write_char_clip_tokenizer(directory / "tokenizer")
    vocab_size = len(json.loads((tokenizer_folder / "vocab.json").read_text()))
    torch.manual_seed(seed)
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=16, num_layers=2,
        embedding_dim=embedding_dim, num_embeddings=TEXT_LENGTH, additional_embeddings=4,
    )
    with torch.no_grad():
        prior.clip_mean.copy_(0.1 * torch.randn_like(prior.clip_mean))
        prior.clip_std.copy_(0.5 + torch.rand_like(prior.clip_std))
    prior.save_pretrained(directory / "prior", safe_serialization=True)
    UnCLIPScheduler(
        variance_type="fixed_small_log", clip_sample=True, clip_sample_range=5.0,
        prediction_type=prediction_type, num_train_timesteps=1000,
    ).save_pretrained(directory / scheduler_folder)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=embedding_dim, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_LENGTH,
        projection_dim=embedding_dim, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    CLIPTextModelWithProjection(text_config).eval().save_pretrained(
        directory / "text_encoder", safe_serialization=True
    )
    return directory
