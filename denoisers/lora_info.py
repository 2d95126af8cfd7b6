"""The prompt and token a LoRA folder of `adapt personalize` was trained with.

`adapt personalize` writes `adapt_config.json` beside the LoRA weights; its `certify`
entry holds the prompt template and the token the LoRA was trained on (DreamBooth's
C("sks")). A denoiser that loads the LoRA should be conditioned on the same text, so
`certify`, `denoise` and `adapt finetune` take these unless the user gives their own:

    prompt, token = resolve_lora_prompt(lora, prompt, token)   # None: not given

A LoRA folder without that file (made elsewhere) records nothing: then a prompt or
token not given is "" (IF-II's default, the empty prompt of Eq. 9).

Only reads JSON; imports nothing of the project (denoisers must not import adapt).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# The record `adapt personalize` writes beside the LoRA weights (adapt.personalize
# imports this name, so the two cannot drift apart).
LORA_RECORD = "adapt_config.json"


def recorded_lora_prompt(lora: str | os.PathLike | None) -> dict[str, str] | None:
    """{"prompt": template, "token": token} recorded in the LoRA folder, or None when the
    folder holds no readable record of `adapt personalize` (or `lora` is None)."""
    if lora is None:
        return None
    path = Path(lora).expanduser() / LORA_RECORD
    try:
        record: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    certify = record.get("certify") if isinstance(record, dict) else None
    if not isinstance(certify, dict):
        return None
    prompt, token = certify.get("prompt"), certify.get("token")
    if not isinstance(prompt, str) or not isinstance(token, str):
        return None
    return {"prompt": prompt, "token": token}


def resolve_lora_prompt(
    lora: str | os.PathLike | None, prompt: str | None, token: str | None
) -> tuple[str, str]:
    """(prompt, token) for a denoiser with this LoRA: each one given (not None) is kept,
    each one not given is the LoRA folder's recorded value, else "". A given prompt without
    a "{}" takes no recorded token (`--prompt ""` means the empty prompt, not an error)."""
    recorded = recorded_lora_prompt(lora) or {}
    if prompt is None:
        prompt = recorded.get("prompt", "")
    if token is None:
        token = recorded.get("token", "") if "{}" in prompt else ""
    return prompt, token
