"""Classifier-guided DreamBooth personalization of DeepFloyd IF-II (Choi et al. 2024, Sec. 3.2).

Fine-tunes LoRA adapters of the IF-II UNet on a reference set D^g with the prompt
C(token) (Eq. 10-12, Algorithm 2 lines 6-16). For a batch of references x in [-1, 1]
with labels c, timesteps t and noise eps:

    x_t     = sqrt(a_t) x + sqrt(1 - a_t) eps                         (Eq. 5)
    eps_hat = UNet([x_t, x_t], t, tau(C(token)), class_labels = k t)  (x_t conditions itself)
    L_diff  = mean (eps - eps_hat)^2                                  (Eq. 10, DreamBooth)
    x~      = x_t / sqrt(a_t) - sqrt((1 - a_t) / a_t) eps_hat         (Eq. 9 at t), in [0, 1]
    L_clf   = CE(f(x~), c)                                            (Eq. 11, f frozen)
    loss    = L_diff + lam * L_clf                                    (Eq. 12)

The text encoder and the classifier stay frozen; the prompt embedding is computed once
and T5 released. The result is a folder `certify --denoiser if2 --lora OUT --prompt
PROMPT --token TOKEN` loads (`pytorch_lora_weights.safetensors`, saved with the IF-II
pipeline's `save_lora_weights`), with `adapt_config.json` (settings, final losses, the
denoiser options for certify), `loss_log.tsv`, `loss_curve.png` and `checkpoints/`.

Choices, checked against the paper's code (ChoiDae1/robustify-T2I,
`self_personalization.py` and `scripts/self_personalization.sh`; read, not copied):
- t ~ U{0, ..., T-1}, one per image, as the reference (`randint(0, T)`, diffusers'
  DreamBooth); the paper writes U([0, T]).
- No prior preservation: the reference runs without it (its flag is off).
- The condition's level t' = floor(k t) clamped to T - 1, the rule the denoiser uses at
  certification (`denoisers.timesteps.corrected_timestep`); the reference feeds the
  float k t clamped to T, less than one step away.
- Eq. 9 clips the estimate to [-1, 1] before mapping it to [0, 1] for the classifier:
  the reference's scheduler step applies IF-II's dynamic thresholding, which is this
  clip (sample_max_value 1).
- L_diff covers the noise channels only (IF-II also predicts a variance, left
  untrained, as in the reference and diffusers' DreamBooth); both losses are batch
  means, as in the reference (lam = 0.01 is calibrated for that scale).
- Optimizer and schedule: AdamW (betas 0.9/0.999, weight decay 1e-2, eps 1e-8) over the
  LoRA parameters only, gradient norm clipped at 1, cosine decay without warm-up: the
  reference's settings (diffusers' DreamBooth defaults with `--lr_scheduler cosine`).
- Batches of `batch_size` references, capped at the size of the set (the reference's
  data loader never repeats an image in a batch), cut from a stream of shuffled epochs.
  The paper's 24 was 6 per GPU on 4 GPUs, so its global batch repeats images when the
  set is smaller than 24: `batch_size=6, grad_accum=4` is that effective batch on one
  device (four micro-batches of 6 per update, the same gradient as one batch of 24).
- Images are resized to `resolution`: 224 by default, the evaluation size the
  reference trains at (`--resolution 96` for STL-10; None: the UNet's sample size,
  256 for IF-II-L).
- LoRA: peft adapters of rank r (alpha = r) on the attention projections, IF's added
  key/value projections included; the reference's diffusers-0.2x LoRA attention
  processors (rank 4) adapt the same layers.
- lam = 0 is plain DreamBooth: the classifier is then neither built nor called.

Randomness: batch order, timesteps and noise of step s come from generators seeded by
(seed, s) (`adapt.training.step_generator`), drawn on the CPU, so a resumed run repeats
an uninterrupted one exactly (on the same device and software). Under a launcher
(`accelerate launch`, `torchrun`) the processes train with DDP: `batch_size` is the
global batch, each process takes its block of it (`adapt.training.process_share`), and
only the main process writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapt.errors import AdaptError
from adapt.training import (
    STREAM_STEP,
    TRAINING_RESOLUTION,
    WEIGHT_DTYPES,
    Optimization,
    bitsandbytes_module,
    build_classifier_on,
    check_batch_for_processes,
    check_finite_loss,
    check_int,
    check_number,
    check_training_settings,
    finish_run,
    honour_umask,
    load_batch,
    make_accelerator,
    make_optimizer,
    micro_slice,
    open_run,
    prepare_run,
    process_share,
    seed_everything,
    step_generator,
    train_steps,
    training_device,
)
from denoisers.lora_info import LORA_RECORD

CONFIG_NAME = LORA_RECORD
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
LOG_COLUMNS = ["step", "loss", "L_diff", "L_clf", "lr", "seconds"]
PLOT_COLUMNS = ["loss", "L_diff", "L_clf"]


@dataclass
class PersonalizeConfig:
    """Settings of `personalize` (defaults: the paper's, Appendix A.4).

    references: reference set folder (`adapt synthesize` output or an ImageFolder tree).
    out: output folder for the LoRA weights.
    checkpoint: IF-II pipeline, hub id or save_pretrained folder.
    classifier, classifier_options: the frozen classifier of L_clf, built with
        `classifiers.build_classifier(classifier, class_names=<the set's classes>, ...)`.
    token, prompt: the conditioning text is `prompt` with "{}" replaced by `token`.
    k: timestep correction factor (Eq. 8). lam: weight of L_clf (Eq. 12).
    steps, lr, batch_size, rank: optimizer steps, learning rate, images per micro-batch
        (capped at the number of references), LoRA rank.
    grad_accum: micro-batches per update (effective batch: batch_size x grad_accum).
    checkpoint_every: save resumable state every N steps (0: never; SIGINT and SIGTERM
        always checkpoint). keep_checkpoints: how many to keep while running.
    variant: checkpoint file variant to load (e.g. "fp16": DeepFloyd's *.fp16.safetensors).
    mixed_precision: "no", "fp16" or "bf16" (frozen weights in that dtype, LoRA in fp32).
    gradient_checkpointing, use_8bit_adam: memory savers (8-bit AdamW needs bitsandbytes).
    resolution: training size (224, the paper's code's; 96 for STL-10; None: the UNet's
        sample size).
    overwrite: replace a folder holding another run.
    lr_scheduler, max_grad_norm, weight_decay: the reference implementation's values.
    """

    references: str
    out: str
    checkpoint: str = "DeepFloyd/IF-II-L-v1.0"
    classifier: str = "clip-b32"
    classifier_options: dict[str, Any] = field(default_factory=dict)
    token: str = "sks"
    prompt: str = "a photo of a {}."
    k: float = 1.8
    lam: float = 0.01
    steps: int = 500
    lr: float = 1e-4
    batch_size: int = 24
    grad_accum: int = 1
    rank: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 1
    seed: int = 0
    device: str = "cpu"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    resolution: int | None = TRAINING_RESOLUTION
    variant: str | None = None
    overwrite: bool = False
    lr_scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    weight_decay: float = 1e-2

    def validate(self) -> None:
        """Raise `AdaptError` for a setting no run could use."""
        from adapt.references import check_template

        check_training_settings(self)
        check_number("lam", self.lam, minimum=0.0)
        check_int("steps", self.steps, minimum=1)
        check_int("rank", self.rank, minimum=1)
        check_template(self.prompt)  # the token must have a place in the prompt
        if self.use_8bit_adam:
            bitsandbytes_module()


# -- the model pieces -------------------------------------------------------------------


def add_lora(unet: torch.nn.Module, rank: int) -> dict[str, torch.nn.Parameter]:
    """Freeze the UNet and attach trainable LoRA adapters; return them by name.

    peft's "gaussian" initialisation: A ~ N(0, 1/r), B = 0, so the adapted UNet starts
    as the pretrained one. Trainable weights are kept in float32 (the frozen ones may be
    16-bit), as diffusers' training scripts do.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGET_MODULES,
        )
    )
    cast_training_params(unet, dtype=torch.float32)
    trainable = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    if not trainable or not all("lora_" in name for name in trainable):
        raise RuntimeError("LoRA injection left no adapter or other trainable weights")
    return trainable


def build_frozen_classifier(
    name: str, class_names: list[str], options: dict[str, Any], device: torch.device
) -> torch.nn.Module:
    """The classifier `name` for these classes, on `device`, in eval mode, without gradients."""
    classifier = build_classifier_on(name, class_names, options, device).eval()
    classifier.requires_grad_(False)
    return classifier


def personalization_losses(
    unet: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    *,
    scheduler: Any,
    prompt_embeds: torch.Tensor,
    k: float,
    classifier: torch.nn.Module | None = None,
    lam: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, L_diff, L_clf) of Eq. 10-12 for one batch; L_clf is None when lam = 0.

    `images` are references in [-1, 1], `timesteps` and `noise` the draws of Algorithm 2
    lines 8-9, `scheduler` the IF-II DDPMScheduler (its alphas_cumprod).
    """
    from denoisers.if2 import denoise_at_timesteps

    x_t = scheduler.add_noise(images, noise, timesteps)  # Eq. 5
    eps_hat, denoised = denoise_at_timesteps(
        unet, x_t, timesteps, prompt_embeds, alphas_cumprod=scheduler.alphas_cumprod, k=k
    )
    l_diff = F.mse_loss(eps_hat, noise.float())  # Eq. 10
    if lam == 0:
        return l_diff, l_diff, None
    if classifier is None:
        raise ValueError("lam > 0 needs a classifier")
    l_clf = F.cross_entropy(classifier(denoised).float(), labels)  # Eq. 11
    return l_diff + lam * l_clf, l_diff, l_clf  # Eq. 12


def save_lora(unet: torch.nn.Module, out: Path) -> Path:
    """Save the UNet's LoRA weights (float32) as the IF-II pipeline's LoRA file, atomically."""
    from diffusers import IFSuperResolutionPipeline
    from peft.utils import get_peft_model_state_dict

    state = {
        name: tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in get_peft_model_state_dict(unet).items()
    }
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".lora."))
    try:
        IFSuperResolutionPipeline.save_lora_weights(
            tmp, unet_lora_layers=state, safe_serialization=True
        )
        honour_umask(tmp / LORA_WEIGHTS)  # safetensors writes files private (0600)
        os.replace(tmp / LORA_WEIGHTS, out / LORA_WEIGHTS)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / LORA_WEIGHTS


# -- the run ----------------------------------------------------------------------------


def personalize(config: PersonalizeConfig, progress: bool = True) -> Path:
    """Train LoRA adapters of IF-II on the references (Eq. 12); return the output folder.

    Resumes from the folder's last checkpoint when it holds an unfinished run with the
    same settings, returns at once when that run is complete, and refuses (AdaptError,
    nothing changed) a folder holding another run unless `config.overwrite`.
    """
    from adapt.references import load_reference_set
    from denoisers import if2

    references, folder = prepare_run(
        config, kind="personalize", config_name=CONFIG_NAME, weights_name=LORA_WEIGHTS,
        inputs={"checkpoint": config.checkpoint, **_classifier_inputs(config)},
    )
    accelerator = make_accelerator(config.mixed_precision, config.device)
    device = training_device(accelerator, config.device)
    batch_size = min(config.batch_size, len(references))
    check_batch_for_processes("batch_size (--batch-size, capped at the number of references)",
                              batch_size, accelerator)
    folder.check()
    start = open_run(folder, accelerator)
    if start.complete:
        return folder.out

    seed_everything(config.seed)
    parts = if2.load_if2(
        config.checkpoint,
        prompt=config.prompt,
        token=config.token,
        device=device,
        dtype=WEIGHT_DTYPES[config.mixed_precision],
        variant=config.variant,
    )
    unet, scheduler, prompt_embeds = parts.unet.to(device), parts.scheduler, parts.prompt_embeds
    multiple = 2 ** (len(unet.config.down_block_types) - 1)
    resolution = config.resolution or int(unet.config.sample_size)
    if resolution % multiple:
        raise AdaptError(
            f"resolution {resolution} is not a multiple of {multiple}, which this UNet needs"
        )
    references = load_reference_set(config.references, size=resolution)

    seed_everything(config.seed)  # the LoRA initialisation
    lora = add_lora(unet, config.rank)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    classifier = None
    if config.lam > 0:
        classifier = build_frozen_classifier(
            config.classifier, list(references.classes), config.classifier_options, device
        )
    optimization = Optimization(
        accelerator,
        make_optimizer(
            list(lora.values()),
            lr=config.lr,
            weight_decay=config.weight_decay,
            use_8bit=config.use_8bit_adam,
        ),
        lr_scheduler=config.lr_scheduler,
        steps=config.steps,
        parameters=list(lora.values()),
        max_grad_norm=config.max_grad_norm,
        module=unet,
    )
    if accelerator.is_main_process:
        folder.write_record(
            resolution=resolution,
            batch_size=batch_size,
            grad_accum=config.grad_accum,
            effective_batch_size=batch_size * config.grad_accum,
            processes=accelerator.num_processes,
            batch_size_per_process=batch_size // accelerator.num_processes,
            classes=list(references.classes),
            num_references=len(references),
            prompt_text=parts.info["prompt"],
            trainable_parameters=sum(p.numel() for p in lora.values()),
        )
    share = process_share(batch_size, accelerator)
    num_timesteps = int(scheduler.config.num_train_timesteps)

    accumulate = config.grad_accum

    def compute(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float], dict[str, str]]:
        # This process's share of the global micro-batch (all of it in one process).
        images, labels = load_batch(references, config.seed, step * accumulate + micro,
                                    batch_size, share)
        # The draws of the whole step (all micro-batches, all processes) from the one
        # generator of (seed, step), as one process makes them, then sliced: micro-batch,
        # then this process's share. Every process draws the same numbers.
        generator = step_generator(config.seed, STREAM_STEP, step)
        size = batch_size * accumulate
        timesteps = torch.randint(0, num_timesteps, (size,), generator=generator)
        noise = torch.randn((size, *images.shape[1:]), generator=generator)
        part = micro_slice(micro, batch_size)
        timesteps, noise = timesteps[part][share], noise[part][share]
        with accelerator.autocast():
            loss, l_diff, l_clf = personalization_losses(
                unet,
                (2.0 * images - 1.0).to(device),
                labels.to(device),
                timesteps.to(device),
                noise.to(device),
                scheduler=scheduler,
                prompt_embeds=prompt_embeds,
                k=config.k,
                classifier=classifier,
                lam=config.lam,
            )
        check_finite_loss(loss, step, {"L_diff": l_diff, "L_clf": l_clf})
        values = {
            "loss": float(loss.detach()),
            "L_diff": float(l_diff.detach()),
            "L_clf": float("nan") if l_clf is None else float(l_clf.detach()),
        }
        postfix = {"L_diff": f"{values['L_diff']:.4f}"}
        if l_clf is not None:
            postfix["L_clf"] = f"{values['L_clf']:.4f}"
        return loss, values, postfix

    log = train_steps(
        folder, start, compute, optimization, weights=lora, steps=config.steps,
        log_columns=LOG_COLUMNS, plot_columns=PLOT_COLUMNS,
        checkpoint_every=config.checkpoint_every, desc="personalize", progress=progress,
        grad_accum=accumulate,
    )
    if accelerator.is_main_process:  # the weights are equal in every process
        save_lora(unet, folder.out)
        finish_run(
            folder, log, PLOT_COLUMNS, title="adapt personalize",
            certify={
                "denoiser": "if2",
                "denoiser_checkpoint": config.checkpoint,
                "lora": str(folder.out),
                "prompt": config.prompt,
                "token": config.token,
                "k": config.k,
                "variant": config.variant,
            },
        )
    accelerator.wait_for_everyone()  # the result exists before any process reads it
    return folder.out


def _classifier_inputs(config: PersonalizeConfig) -> dict[str, Any]:
    options = config.classifier_options
    return {"classifier_checkpoint": options.get("pretrained"),
            "classifier_weights": options.get("weights")}
