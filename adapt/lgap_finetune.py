"""Classifier fine-tuning on LGAP-purified clean images (seed 001, Sec. 3.2 and 4.1).

LGAP's last step ("Final image reconstruction and training"): with x^_i the purified
copy of the clean training image x_i (BLIP caption, caption-guided img2img:
`denoisers.purifiers.lgap`),

    theta* = argmin_theta (1/n) sum_i CE(f_theta(x^_i), y_i).

The paper fine-tunes its WideResNet-28-10 "on images generated from the diffusion
network for 15 epochs" with Adam at learning rate 1e-3 (Sec. 4.1): the defaults here.
The optimizer is `adapt.training.make_optimizer`'s AdamW with weight decay 0, which is
Adam's update exactly. What the paper does not give, our choices: batch size 128, a
constant learning rate, no gradient clipping, every weight of the classifier trained.

Purification: each training image is purified once, with a generator of its own seeded
from (seed, image index), so it gets the same purified copy in every epoch, in any
batch, and after a resume ("images generated from the diffusion network" are one set);
the copies are kept in memory after their first use (a 32 x 32 RGB image: 12 KiB), so
LGAP runs once per image. The purifier runs without gradients; only the classifier
learns.

Shared with `adapt finetune` (`adapt.finetune`, `adapt.training`): the output folder
(`classifier.safetensors`, `finetune_config.json` of kind "lgap-finetune",
`loss_log.tsv`, `loss_curve.png`, resumable `checkpoints/`), the refusal of a folder
holding another run, the batch stream of seeded shuffled epochs, the classifier builder
(any registered one; CLIP through its zero-shot head) and the loop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapt.errors import AdaptError
from adapt.finetune import (
    CLASSIFIER_WEIGHTS,
    CONFIG_NAME,
    LOG_COLUMNS,
    PLOT_COLUMNS,
    build_trainable_classifier,
    classifier_logits,
)
from adapt.training import (
    LR_SCHEDULERS,
    MIXED_PRECISION,
    STREAM_STEP,
    WEIGHT_DTYPES,
    Optimization,
    check_finite_loss,
    check_int,
    check_number,
    finish_run,
    honour_umask,
    make_accelerator,
    make_optimizer,
    prepare_run,
    seed_everything,
    step_generator,
    stream_batch,
    train_steps,
)

KIND = "lgap-finetune"
# Generators of `adapt.training.step_generator`: after its STREAM_ORDER (0), STREAM_STEP (1).
STREAM_PURIFY = STREAM_STEP + 1


@dataclass
class LGAPFinetuneConfig:
    """Settings of `lgap_finetune` (defaults: the paper's, Sec. 4.1, or our choice).

    references: the clean training images (an ImageFolder tree, or `adapt synthesize`
        output). out: output folder.
    classifier, classifier_options, templates: the classifier to tune, as `adapt.finetune`
        builds it (`classifiers.build_classifier(classifier, class_names=<the set's>, ...)`).
    caption_checkpoint, ldm_checkpoint, strength, num_inference_steps, guidance_scale,
        purify_resolution, variant: LGAP's (`denoisers.purifiers.lgap.build`); strength is
        the paper's t: 0.5 for CIFAR (default), 0.1 for ImageNet.
    epochs, lr: 15 and 1e-3 (the paper); batch_size 128, lr_scheduler "constant" (ours).
    resolution: training image size (None: the files' own size).
    denoise_batch_size: images per LGAP call (memory only).
    """

    references: str
    out: str
    classifier: str = "resnet50"
    classifier_options: dict[str, Any] = field(default_factory=dict)
    templates: list[str] | None = None
    caption_checkpoint: str | None = None
    ldm_checkpoint: str | None = None
    strength: float = 0.5
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    purify_resolution: int | None = 512
    variant: str | None = None
    epochs: int = 15
    lr: float = 1e-3
    batch_size: int = 128
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    lr_scheduler: str = "constant"
    resolution: int | None = None
    denoise_batch_size: int = 16
    checkpoint_every: int = 100
    keep_checkpoints: int = 1
    seed: int = 0
    device: str = "cpu"
    mixed_precision: str = "no"
    overwrite: bool = False

    def validate(self) -> None:
        """Raise `AdaptError` for a setting no run could use (before anything is read)."""
        from denoisers.purifiers.lgap import check_hyperparameters

        if not str(self.references).strip():
            raise AdaptError("references: give the folder of clean training images")
        if not str(self.out).strip():
            raise AdaptError("out: give an output folder")
        check_number("lr", self.lr, minimum=0.0, strict=True)
        check_number("weight_decay", self.weight_decay, minimum=0.0)
        if self.max_grad_norm is not None:
            check_number("max_grad_norm", self.max_grad_norm, minimum=0.0, strict=True)
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints",
                     "denoise_batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("checkpoint_every", self.checkpoint_every, minimum=0)
        check_int("seed", self.seed, minimum=0)
        for name in ("resolution", "purify_resolution"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        if self.mixed_precision not in MIXED_PRECISION:
            raise AdaptError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                             f"got {self.mixed_precision!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise AdaptError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, "
                             f"got {self.lr_scheduler!r}")
        if not isinstance(self.classifier_options, dict):
            raise AdaptError("classifier_options must be a dict of builder options")
        try:
            check_hyperparameters(self.strength, self.num_inference_steps, self.guidance_scale)
        except ValueError as error:
            raise AdaptError(str(error)) from error

    def purifier_options(self) -> dict[str, Any]:
        """The `denoisers.purifiers.lgap.load_purifier` options of these settings."""
        from denoisers.purifiers import lgap

        return {
            "caption_checkpoint": self.caption_checkpoint or lgap.DEFAULT_CAPTION_CHECKPOINT,
            "ldm_checkpoint": self.ldm_checkpoint or lgap.DEFAULT_LDM_CHECKPOINT,
            "strength": self.strength,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "resolution": self.purify_resolution,
            "variant": self.variant,
        }


def purification_generator(seed: int, index: int) -> torch.Generator:
    """The generator LGAP purifies training image `index` with (the same in every epoch)."""
    return step_generator(seed, STREAM_PURIFY, index)


class PurifiedImages:
    """x^_i = LGAP(x_i) for training images by index, purified once and kept (CPU)."""

    def __init__(self, purifier: Any, seed: int, chunk: int):
        self.purifier = purifier
        self.seed = seed
        self.chunk = chunk
        self.cache: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, indices: list[int], images: torch.Tensor) -> torch.Tensor:
        missing = [k for k, index in enumerate(indices) if index not in self.cache]
        for start in range(0, len(missing), self.chunk):
            rows = missing[start : start + self.chunk]
            generators = [purification_generator(self.seed, indices[k]) for k in rows]
            purified = self.purifier.purify(images[rows], generators)
            for k, image in zip(rows, purified.cpu(), strict=True):
                self.cache[indices[k]] = image
        return torch.stack([self.cache[index] for index in indices])


def with_resolved_checkpoints(config: LGAPFinetuneConfig) -> LGAPFinetuneConfig:
    """The config with LGAP's local checkpoint folders as absolute paths, so that the
    settings a rerun compares name the same folders from any working directory (as
    `adapt.training.result_settings` does for the references)."""
    changes = {}
    for name in ("caption_checkpoint", "ldm_checkpoint"):
        value = getattr(config, name)
        if value and Path(value).expanduser().is_dir():
            changes[name] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(config, **changes)


def lgap_finetune(config: LGAPFinetuneConfig, progress: bool = True) -> Path:
    """Fine-tune the classifier on LGAP-purified clean images; return the output folder.

    Resumes, returns at once when complete, or refuses (AdaptError, nothing changed) as
    `adapt.finetune.finetune` does. A missing LGAP checkpoint raises the purifier's
    `CheckpointError` before anything is written.
    """
    from adapt.references import load_reference_set
    from classifiers.weights_io import save_classifier_weights
    from denoisers.purifiers.lgap import load_purifier

    config = with_resolved_checkpoints(config)
    options = config.classifier_options
    references, folder = prepare_run(
        config, kind=KIND, config_name=CONFIG_NAME, weights_name=CLASSIFIER_WEIGHTS,
        inputs={"caption_checkpoint": config.caption_checkpoint,
                "ldm_checkpoint": config.ldm_checkpoint,
                "classifier_checkpoint": options.get("pretrained"),
                "classifier_weights": options.get("weights")},
    )
    folder.check()  # refuse another run's folder before spending time on models
    device = torch.device(config.device)
    purifier, purifier_settings = load_purifier(
        **config.purifier_options(), device=device,
        dtype=WEIGHT_DTYPES[config.mixed_precision], gradient_checkpointing=False,
    )
    seed_everything(config.seed)
    classifier, network = build_trainable_classifier(
        config.classifier, list(references.classes), options, device, config.templates
    )
    start = folder.open()
    if start.complete:
        return folder.out

    accelerator = make_accelerator(config.mixed_precision, device)
    if config.resolution is not None:
        references = load_reference_set(config.references, size=config.resolution)
    batch_size = min(config.batch_size, len(references))
    accumulate = config.grad_accum
    steps_per_epoch = math.ceil(len(references) / (batch_size * accumulate))
    total = config.epochs * steps_per_epoch
    purified_images = PurifiedImages(purifier, config.seed, config.denoise_batch_size)

    trainable = [p for p in network.parameters() if p.requires_grad]
    optimization = Optimization(
        accelerator,
        # AdamW without weight decay: Adam (the paper's optimizer).
        make_optimizer(trainable, lr=config.lr, weight_decay=config.weight_decay),
        lr_scheduler=config.lr_scheduler, steps=total, parameters=trainable,
        max_grad_norm=config.max_grad_norm,
    )
    folder.write_record(
        batch_size=batch_size, grad_accum=accumulate, steps=total,
        steps_per_epoch=steps_per_epoch, classes=list(references.classes),
        num_references=len(references), purifier=purifier_settings,
        trainable_parameters=sum(p.numel() for p in trainable),
    )

    def compute(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float], dict[str, str]]:
        indices = stream_batch(config.seed, step * accumulate + micro, batch_size,
                               len(references))
        items = [references[i] for i in indices]
        images = torch.stack([image for image, _ in items])
        labels = torch.tensor([int(label) for _, label in items], device=device)
        purified = purified_images(indices, images).to(device)
        with accelerator.autocast():
            logits = classifier_logits(classifier, purified)
            loss = F.cross_entropy(logits.float(), labels)  # Sec. 3.2
        check_finite_loss(loss, step)
        values = {
            "epoch": step // steps_per_epoch + 1,
            "L_clf": float(loss.detach()),
            "accuracy": float((logits.detach().argmax(1) == labels).float().mean()),
        }
        return loss, values, {"L_clf": f"{values['L_clf']:.4f}", "acc": f"{values['accuracy']:.2f}"}

    classifier.train()
    log = train_steps(
        folder, start, compute, optimization, weights=network.state_dict(), steps=total,
        log_columns=LOG_COLUMNS, plot_columns=PLOT_COLUMNS,
        checkpoint_every=config.checkpoint_every, desc="lgap finetune", progress=progress,
        grad_accum=accumulate, epoch_steps=steps_per_epoch,
    )
    classifier.eval()
    save_classifier_weights(network, folder.weights_path)
    honour_umask(folder.weights_path)  # written through a private temporary file
    use = {
        "model": config.classifier,
        "classifier_weights": str(folder.weights_path),
        "classifier_checkpoint": options.get("pretrained"),
        "templates": getattr(classifier, "templates", None),
        "purifier": "lgap",
        **{k: v for k, v in config.purifier_options().items()},
    }
    finish_run(folder, log, PLOT_COLUMNS, title="LGAP fine-tuning", certify=use)
    return folder.out
