"""Classifier fine-tuning on denoised references (Choi et al. 2024, Sec. 3.2, Eq. 13).

Minimizes L_clf(theta*, psi) over the classifier's weights psi with the denoiser theta*
frozen (Algorithm 2, lines 6-12 and 17). For a batch of references x in [0, 1] with
labels c and noise eps:

    random timesteps (Algorithm 2, the default):
        t ~ U{0, ..., T-1} per image,  x_t = sqrt(a_t) (2x - 1) + sqrt(1 - a_t) eps   (Eq. 5)
    given noise levels (`sigmas`, e.g. the sigmas you will certify at):
        sigma ~ U(sigmas) per image, t = timestep_for_sigma(2 sigma) (Eq. 6),
        x_t = sqrt(a_t) (2 (x + sigma eps) - 1)   -- exactly what `certify` feeds IF-II
    x~    = Eq. 9 at t (IF-II, `denoisers.if2.denoise_at_timesteps`), in [0, 1]
    L_clf = CE(f_psi(x~), c)                                                  (Eq. 13)

The denoiser is IF-II, optionally with the LoRA of `adapt personalize` and its prompt,
loaded by `denoisers.if2.load_if2` exactly as `certify --denoiser if2` loads it. The
one-step diffusion denoiser (`denoiser="dds"`, e.g. the bundled digits DDPM for the
`digits-*` CNNs) works with given `sigmas` only; references are then converted to the
denoiser's channel count (grey = mean of RGB) and `resolution`.

Classifiers: any registered one. CLIP (`clip-*`): both encoders are tuned; every step
rebuilds the class embeddings from the text encoder being tuned (the mean over the
prompt templates of the normalized text embeddings, with gradients), so the text
tower learns through the zero-shot head; CLIP's temperature `logit_scale` stays fixed.
The (class x template) prompts go through the text encoder in chunks of whole classes
(`text_batch_size` prompts at most), each under `torch.utils.checkpoint`: only a
chunk's embeddings are kept after the forward, and the backward recomputes one chunk's
graph at a time, so memory is bounded by a chunk (ImageNet's 1000 classes x 80
templates would otherwise keep all 80,000 graphs, terabytes) and the gradient is the
one of the unchunked graph (to float rounding; tested). The text encoder then runs its
forward twice per step. The paper's code uses one template, `PAPER_TEMPLATE`.
torchvision ResNets and the digits CNN: all weights, in train mode (batch norm updates
its statistics, as the reference does).

Output folder: `classifier.safetensors` (the state dict of the network, `classifier.model`
for CLIP and torchvision, the CNN itself for digits: what `--classifier-weights` loads;
for CLIP, loading rebuilds the class embeddings from the tuned text tower because the
embedding cache is keyed by the text tower's weights), `finetune_config.json` (settings,
final losses, the `certify` options), `loss_log.tsv`, `loss_curve.png`, `checkpoints/`.

Choices, checked against the paper's code (ChoiDae1/robustify-T2I,
`classifier_finetuning.py`, `scripts/classifier_finetuning.sh`; read, not copied):
AdamW with weight decay 0, cosine decay to 0 without warm-up, no gradient clipping, the
batch capped at the size of the reference set, timesteps `randint(0, T)` per image,
IF-II run without gradients (only psi is optimized). The reference's CLIP text side is
one template ("This is a photo of a {}"); here it is the classifier's own templates (the
ones `certify` will use), which `templates` can replace. Batches are cut from a stream
of seeded shuffled epochs (`adapt.training.stream_batch`), so every batch is full;
steps = epochs * ceil(references / (batch size x grad_accum)). A checkpoint is written
at the end of every epoch (10 epochs are only 10-40 steps at the paper's settings) and
every `checkpoint_every` steps. Training images are resized to `resolution`, 224 by
default: the evaluation size the reference trains at (96 for STL-10).

Under a launcher (`accelerate launch`, `torchrun`) the processes train with DDP:
`batch_size` is the global batch, each process takes its block of it
(`adapt.training.process_share`), and only the main process writes. Batch norm layers
(torchvision ResNets) are synchronized on GPUs and refused on CPU processes.
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
from adapt.training import (
    STREAM_STEP,
    TRAINING_RESOLUTION,
    WEIGHT_DTYPES,
    Optimization,
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

CONFIG_NAME = "finetune_config.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
DENOISERS = ("if2", "dds")
LOG_COLUMNS = ["step", "epoch", "L_clf", "accuracy", "lr", "seconds"]
PLOT_COLUMNS = ["L_clf", "accuracy"]
# The CLIP template of the paper's fine-tuning code (`classifier_finetuning.py`).
PAPER_TEMPLATE = "This is a photo of a {}"


@dataclass
class FinetuneConfig:
    """Settings of `finetune` (defaults: the paper's, Appendix A.4).

    references: reference set folder (`adapt synthesize` output or an ImageFolder tree).
    out: output folder for `classifier.safetensors`.
    classifier, classifier_options: the classifier to tune, built with
        `classifiers.build_classifier(classifier, class_names=<the set's classes>, ...)`.
    templates: CLIP prompt templates (None: the classifier's own).
    denoiser: "if2" (default) or "dds" (needs `sigmas`).
    denoiser_checkpoint: the denoiser's weights (None: IF-II-L for if2; required for dds).
    lora, prompt, token, k: IF-II's LoRA folder, prompt template, token and timestep
        correction, as `certify --denoiser if2` takes them; a prompt or token left None
        is the one the LoRA folder records (`denoisers.lora_info`), else "".
    variant: the if2 checkpoint's file variant (e.g. "fp16").
    sigmas: noise levels in [0, 1] space to train at (None: random timesteps).
    epochs, lr, batch_size: passes over the references, learning rate, images per
        micro-batch (capped at the number of references).
    grad_accum: micro-batches per update (effective batch: batch_size x grad_accum).
    weight_decay, max_grad_norm, lr_scheduler: AdamW's decay, gradient clipping (None:
        off), "cosine" or "constant".
    resolution: training image size (224; 96 for STL-10; None: the first reference's size).
    denoise_batch_size: images per denoiser call (memory only).
    text_batch_size: CLIP prompts per text-encoder chunk (memory only; whole classes).
    checkpoint_every: save resumable state every N steps (0: only at epoch ends and on
        SIGINT/SIGTERM). keep_checkpoints: how many to keep while running.
    mixed_precision: "no", "fp16" or "bf16" (the frozen denoiser in that dtype, autocast).
    overwrite: replace a folder holding another run.
    """

    references: str
    out: str
    classifier: str = "clip-b32"
    classifier_options: dict[str, Any] = field(default_factory=dict)
    templates: list[str] | None = None
    denoiser: str = "if2"
    denoiser_checkpoint: str | None = None
    lora: str | None = None
    prompt: str | None = None
    token: str | None = None
    k: float = 1.8
    variant: str | None = None
    sigmas: list[float] | None = None
    epochs: int = 10
    lr: float = 5e-7
    batch_size: int = 256
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    lr_scheduler: str = "cosine"
    resolution: int | None = TRAINING_RESOLUTION
    denoise_batch_size: int = 64
    text_batch_size: int = 256
    checkpoint_every: int = 100
    keep_checkpoints: int = 1
    seed: int = 0
    device: str = "cpu"
    mixed_precision: str = "no"
    overwrite: bool = False

    def validate(self) -> None:
        """Raise `AdaptError` for a setting no run could use."""
        from denoisers.if2 import format_prompt

        check_training_settings(self)
        if self.denoiser not in DENOISERS:
            raise AdaptError(
                f"denoiser must be one of {', '.join(DENOISERS)}, got {self.denoiser!r}"
            )
        if self.denoiser == "dds":
            if not self.sigmas:
                raise AdaptError(
                    "denoiser 'dds' has no per-image timestep path: give the noise levels "
                    "to train at (sigmas, --sigmas 0.25,0.5)"
                )
            if not self.denoiser_checkpoint:
                raise AdaptError("denoiser 'dds' needs denoiser_checkpoint (--denoiser-checkpoint)")
            if self.lora or self.prompt or self.token or self.variant:
                raise AdaptError(
                    "lora, prompt, token and variant apply to the if2 denoiser only"
                )
        if self.sigmas is not None:
            if not self.sigmas:
                raise AdaptError("sigmas: give at least one noise level, or None")
            for sigma in self.sigmas:
                check_number("every sigma", sigma, minimum=0.0, strict=True)
        check_int("epochs", self.epochs, minimum=1)
        check_int("denoise_batch_size", self.denoise_batch_size, minimum=1)
        check_int("text_batch_size", self.text_batch_size, minimum=1)
        if self.templates is not None and not self.templates:
            raise AdaptError("templates: give at least one prompt template, or None")
        try:
            format_prompt(self.prompt or "", self.token or "")
        except ValueError as error:
            raise AdaptError(str(error)) from error


# -- the model pieces -------------------------------------------------------------------


def build_trainable_classifier(
    name: str,
    class_names: list[str],
    options: dict[str, Any],
    device: torch.device,
    templates: list[str] | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(classifier, network): the classifier `name` for these classes, and the module whose
    state dict is its weights file (`classifier.model`, or the classifier itself)."""
    import classifiers

    extra = {}
    if templates is not None:
        if not classifiers.CLASSIFIERS.accepts(name, "templates"):
            raise AdaptError(f"templates apply to CLIP classifiers, not to {name!r}")
        extra["templates"] = list(templates)
    classifier = build_classifier_on(name, class_names, options, device, **extra)
    network = getattr(classifier, "model", classifier)
    if not isinstance(network, torch.nn.Module):
        raise AdaptError(f"classifier {name!r} has no network to fine-tune")
    network.requires_grad_(True)
    if is_zero_shot(classifier):
        network.logit_scale.requires_grad_(False)  # CLIP's temperature stays as trained
    return classifier, network


def is_zero_shot(classifier: torch.nn.Module) -> bool:
    """Whether the classifier has a text-made head (CLIP) rather than trained weights."""
    return hasattr(classifier, "compute_class_embeddings")


def classifier_logits(
    classifier: torch.nn.Module, images: torch.Tensor, text_batch_size: int = 256
) -> torch.Tensor:
    """Logits of images in [0, 1]; for CLIP with class embeddings from the current text
    encoder, with gradients (the cached ones would be stale after the first step),
    computed in chunks of at most `text_batch_size` prompts (`chunked_class_embeddings`)."""
    if is_zero_shot(classifier):
        if torch.is_grad_enabled():
            embeddings = chunked_class_embeddings(classifier, text_batch_size)
        else:
            embeddings = classifier.compute_class_embeddings(grad=False)
        return classifier(images, class_embeddings=embeddings)
    return classifier(images)


def chunked_class_embeddings(classifier: torch.nn.Module, text_batch_size: int) -> torch.Tensor:
    """CLIP's class embeddings [K, D] (per class: the normalized mean over the templates
    of the normalized text embeddings, as `compute_class_embeddings`), with gradients
    through the text encoder, its memory bounded by one chunk of whole classes
    (`text_batch_size` // templates classes, at least one).

    Each chunk runs under `torch.utils.checkpoint` (non-reentrant): its activations are
    dropped after the forward and recomputed in the backward, one chunk at a time. One
    chunk for all classes is a plain graph (nothing to save by recomputing).
    """
    from torch.utils.checkpoint import checkpoint

    names, templates = classifier.class_names, classifier.templates
    per_chunk = max(1, text_batch_size // len(templates))
    device = classifier.model.logit_scale.device

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        text = F.normalize(classifier.model.encode_text(tokens), dim=-1)
        per_class = text.view(-1, len(templates), text.shape[-1]).mean(dim=1)
        return F.normalize(per_class, dim=-1)

    chunks = []
    for start in range(0, len(names), per_chunk):
        prompts = [t.replace("{}", name) for name in names[start : start + per_chunk]
                   for t in templates]
        tokens = classifier.tokenizer(prompts).to(device)
        if per_chunk >= len(names):
            chunks.append(embed(tokens))
        else:
            chunks.append(checkpoint(embed, tokens, use_reentrant=False))
    return torch.cat(chunks)


class FrozenDenoiser:
    """The denoiser of Eq. 13: noise references, denoise them without gradients.

    `draw(batch, generator)` draws the per-image timestep or noise level of Algorithm 2
    (line 8) and `denoise(images, noise, draws)` returns x~ in [0, 1] (lines 10-12).
    """

    def __init__(self, config: FinetuneConfig, device: torch.device):
        config = with_lora_prompt(config)
        self.device = device
        self.sigmas = None if config.sigmas is None else [float(s) for s in config.sigmas]
        self.chunk = config.denoise_batch_size
        self.kind = config.denoiser
        dtype = WEIGHT_DTYPES[config.mixed_precision]
        if self.kind == "if2":
            from denoisers import if2

            parts = if2.load_if2(
                config.denoiser_checkpoint or if2.DEFAULT_CHECKPOINT,
                prompt=config.prompt,
                token=config.token,
                lora=config.lora,
                device=device,
                dtype=dtype,
                variant=config.variant,
            )
            self.unet = parts.unet.to(device).eval().requires_grad_(False)
            self.scheduler = parts.scheduler
            self.prompt_embeds = parts.prompt_embeds
            self.k = config.k
            self.alphas = torch.as_tensor(
                self.scheduler.alphas_cumprod, dtype=torch.float32
            ).to(device)
            self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
            self.channels = int(self.unet.config.in_channels) // 2
            self.info = parts.info
            if self.sigmas is not None:
                from denoisers.timesteps import timestep_for_sigma

                self.sigma_timesteps = torch.tensor(
                    [timestep_for_sigma(self.scheduler.alphas_cumprod, 2 * s)
                     for s in self.sigmas],
                    device=device,
                )
                self.sigma_values = torch.tensor(self.sigmas, device=device)
        else:
            from denoisers.dds import DDSDenoiser

            assert self.sigmas is not None  # validate() checked it
            first = DDSDenoiser.from_pretrained(
                config.denoiser_checkpoint, sigma=self.sigmas[0], device=device, dtype=dtype
            )
            first.requires_grad_(False)
            self.dds = [first] + [first.at(s).to(device) for s in self.sigmas[1:]]
            self.channels = first.channels
            self.info = {"checkpoint": config.denoiser_checkpoint}

    def draw(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Per image: a timestep (random mode) or an index into `sigmas`."""
        high = self.num_timesteps if self.sigmas is None else len(self.sigmas)
        return torch.randint(0, high, (batch,), generator=generator)

    @torch.no_grad()
    def denoise(
        self, images: torch.Tensor, noise: torch.Tensor, draws: torch.Tensor
    ) -> torch.Tensor:
        outputs = [
            self._denoise(images[i : i + self.chunk], noise[i : i + self.chunk],
                          draws[i : i + self.chunk])
            for i in range(0, len(images), self.chunk)
        ]
        return torch.cat(outputs)

    def _denoise(
        self, images: torch.Tensor, noise: torch.Tensor, draws: torch.Tensor
    ) -> torch.Tensor:
        images, noise = images.to(self.device), noise.to(self.device)
        if self.kind == "dds":
            out = torch.empty_like(images)
            for index, denoiser in enumerate(self.dds):
                chosen = draws == index
                if chosen.any():
                    noisy = images[chosen] + denoiser.sigma * noise[chosen]
                    out[chosen] = denoiser(noisy, denoiser.sigma)
            return out
        from denoisers.if2 import denoise_at_timesteps

        x = 2.0 * images - 1.0  # [-1, 1], the diffusion model's space
        if self.sigmas is None:
            timesteps = draws.to(self.device)
            a = self.alphas[timesteps].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x + (1.0 - a).sqrt() * noise  # Eq. 5
        else:
            chosen = draws.to(self.device)
            sigma = self.sigma_values[chosen]
            timesteps = self.sigma_timesteps[chosen]
            a = self.alphas[timesteps].view(-1, 1, 1, 1)
            # certify's input: x + sigma eps in [0, 1] -> 2 (.) - 1, scaled by sqrt(a_t)
            x_t = a.sqrt() * (x + 2.0 * sigma.view(-1, 1, 1, 1) * noise)
        _, denoised = denoise_at_timesteps(
            self.unet, x_t, timesteps, self.prompt_embeds, alphas_cumprod=self.alphas, k=self.k
        )
        return denoised


def fit_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB references for a denoiser of `channels` channels (1: grey as the mean of RGB)."""
    if images.shape[1] == channels:
        return images
    if channels == 1:
        return images.mean(dim=1, keepdim=True)
    raise AdaptError(
        f"cannot feed {images.shape[1]}-channel references to a {channels}-channel denoiser"
    )


def _reference_size(references: Any, resolution: int | None) -> int:
    if resolution is not None:
        return resolution
    image, _ = references[0]
    height, width = image.shape[-2:]
    if height != width:
        raise AdaptError(
            f"reference {references.samples[0][0]} is {width}x{height}: give a square "
            "training size (resolution, --resolution)"
        )
    return int(height)


# -- the run ----------------------------------------------------------------------------


def with_lora_prompt(config: FinetuneConfig) -> FinetuneConfig:
    """The config with its if2 prompt and token settled: each one not given (None) is the
    LoRA folder's recorded one (`denoisers.lora_info`), else ""."""
    if config.denoiser != "if2" or (config.prompt is not None and config.token is not None):
        return config
    from denoisers.lora_info import resolve_lora_prompt

    prompt, token = resolve_lora_prompt(config.lora, config.prompt, config.token)
    return dataclasses.replace(config, prompt=prompt, token=token)


def finetune(config: FinetuneConfig, progress: bool = True) -> Path:
    """Fine-tune the classifier on denoised references (Eq. 13); return the output folder.

    Resumes from the folder's last checkpoint when it holds an unfinished run with the
    same settings, returns at once when that run is complete, and refuses (AdaptError,
    nothing changed) a folder holding another run unless `config.overwrite`.
    """
    from adapt.references import load_reference_set
    from classifiers.weights_io import save_classifier_weights

    config = with_lora_prompt(config)
    options = config.classifier_options
    references, folder = prepare_run(
        config, kind="finetune", config_name=CONFIG_NAME, weights_name=CLASSIFIER_WEIGHTS,
        inputs={"lora": config.lora, "denoiser_checkpoint": config.denoiser_checkpoint,
                "classifier_checkpoint": options.get("pretrained"),
                "classifier_weights": options.get("weights")},
    )
    accelerator = make_accelerator(config.mixed_precision, config.device)
    device = training_device(accelerator, config.device)
    batch_size = min(config.batch_size, len(references))
    check_batch_for_processes("batch_size (--batch-size, capped at the number of references)",
                              batch_size, accelerator)
    folder.check()  # refuse another run's folder before spending time on models

    seed_everything(config.seed)
    classifier, network = build_trainable_classifier(
        config.classifier, list(references.classes), config.classifier_options, device,
        config.templates,
    )
    start = open_run(folder, accelerator)
    if start.complete:
        return folder.out

    denoiser = FrozenDenoiser(config, device)
    size = _reference_size(references, config.resolution)
    references = load_reference_set(config.references, size=size)
    accumulate = config.grad_accum
    steps_per_epoch = math.ceil(len(references) / (batch_size * accumulate))
    total = config.epochs * steps_per_epoch

    trainable = [p for p in network.parameters() if p.requires_grad]
    optimization = Optimization(
        accelerator,
        make_optimizer(trainable, lr=config.lr, weight_decay=config.weight_decay),
        lr_scheduler=config.lr_scheduler,
        steps=total,
        parameters=trainable,
        max_grad_norm=config.max_grad_norm,
        module=network,
    )
    if accelerator.is_main_process:
        folder.write_record(
            resolution=size,
            batch_size=batch_size,
            grad_accum=accumulate,
            effective_batch_size=batch_size * accumulate,
            processes=accelerator.num_processes,
            batch_size_per_process=batch_size // accelerator.num_processes,
            steps=total,
            steps_per_epoch=steps_per_epoch,
            classes=list(references.classes),
            num_references=len(references),
            templates=getattr(classifier, "templates", None),
            denoiser_info=denoiser.info,
            trainable_parameters=sum(p.numel() for p in trainable),
        )
    share = process_share(batch_size, accelerator)

    def compute(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float], dict[str, str]]:
        # This process's share of the global micro-batch (all of it in one process).
        images, labels = load_batch(references, config.seed, step * accumulate + micro,
                                    batch_size, share)
        images = fit_channels(images, denoiser.channels)
        # The draws of the whole step (all micro-batches, all processes) from the one
        # generator of (seed, step), as one process makes them, then sliced: micro-batch,
        # then this process's share. Every process draws the same numbers.
        generator = step_generator(config.seed, STREAM_STEP, step)
        size = batch_size * accumulate
        draws = denoiser.draw(size, generator)
        noise = torch.randn((size, *images.shape[1:]), generator=generator)
        part = micro_slice(micro, batch_size)
        denoised = denoiser.denoise(images, noise[part][share], draws[part][share])  # frozen
        labels = labels.to(device)
        with accelerator.autocast():
            logits = classifier_logits(classifier, denoised, config.text_batch_size)
            loss = F.cross_entropy(logits.float(), labels)  # Eq. 13
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
        checkpoint_every=config.checkpoint_every, desc="finetune", progress=progress,
        grad_accum=accumulate, epoch_steps=steps_per_epoch,
    )
    classifier.eval()
    if not accelerator.is_main_process:  # the weights are equal in every process
        accelerator.wait_for_everyone()  # ... until the main process has written them
        return folder.out
    save_classifier_weights(network, folder.weights_path)
    honour_umask(folder.weights_path)  # written through a private temporary file
    certify: dict[str, Any] = {
        "model": config.classifier,
        "classifier_weights": str(folder.weights_path),
        "classifier_checkpoint": config.classifier_options.get("pretrained"),
        "templates": getattr(classifier, "templates", None),
        "denoiser": config.denoiser,
        "denoiser_checkpoint": denoiser.info.get("checkpoint"),
    }
    if config.denoiser == "if2":
        certify.update(lora=config.lora, prompt=config.prompt, token=config.token, k=config.k,
                       variant=config.variant)
    finish_run(folder, log, PLOT_COLUMNS, title="adapt finetune", certify=certify)
    accelerator.wait_for_everyone()  # the result exists before any process reads it
    return folder.out
