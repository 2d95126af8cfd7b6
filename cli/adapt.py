"""Console script `adapt`: robustify a classifier for a new label set from text alone.

Choi et al. (ECCV 2024), Sec. 3.2 and Algorithm 2: `synthesize` reference images from
the class names, `personalize` the IF-II denoiser on them, `finetune` the classifier on
denoised references, or `run` all three and get the `certify` command that uses them.
The adapt modules are imported inside each command, so `adapt --help` stays quick.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from cli.errors import CommandError

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}
IF2 = "DeepFloyd/IF-II-L-v1.0"
IF1 = "DeepFloyd/IF-I-XL-v1.0"
TEMPLATE = "a photo of a {}."
PRECISIONS = ["no", "fp16", "bf16"]


@contextlib.contextmanager
def _clear_errors() -> Iterator[None]:
    """Refusals and bad input from the library -> one message, exit status 2."""
    from classifiers.registry import UnknownNameError

    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError, UnknownNameError) as error:
        _keep_refusal_status()
        raise CommandError(str(error)) from error


def _keep_refusal_status() -> None:
    """Under a launcher, make this refusing process end with status 2, at once.

    Every process refuses together (adapt.training waits for all before raising), but
    the first to exit makes torchrun send SIGTERM to the others, which would otherwise
    still be tearing down their interpreter (torch, the process group) and be reported
    as killed, not refused. The message is printed and nothing was written, so from here
    on SIGTERM ends the process with status 2, and so does the exit itself, skipping
    the teardown (an atexit hook that flushes the streams and calls os._exit).
    """
    import atexit
    import os
    import signal
    import sys

    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        return

    def refused(*_: Any) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(2)

    signal.signal(signal.SIGTERM, refused)
    atexit.register(refused)


def _positive(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and not value > 0:
        raise click.BadParameter(f"must be > 0, got {value}")
    return value


def _non_negative(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and not value >= 0:
        raise click.BadParameter(f"must be >= 0, got {value}")
    return value


def _sigmas(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None or not value.strip():
        return None
    try:
        sigmas = [float(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not sigmas or any(not s > 0 for s in sigmas):
        raise click.BadParameter(f"noise levels must be > 0, got {value!r}")
    return sigmas


def _class_names(labels: str | None, dataset: str | None) -> list[str]:
    from adapt.references import dataset_labels, read_labels

    if (labels is None) == (dataset is None):
        raise click.UsageError("give the class names with exactly one of --labels FILE or "
                               "--dataset NAME")
    with _clear_errors():
        return read_labels(labels) if labels is not None else dataset_labels(dataset)


def _classifier_options(checkpoint: str | None, weights: str | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {} if checkpoint is None else {"pretrained": checkpoint}
    if weights is not None:
        options["weights"] = weights
    return options


def _options(*decorators: Callable) -> Callable:
    return lambda command: functools.reduce(lambda c, d: d(c), reversed(decorators), command)


def _check_references(references: str) -> None:
    """Fail on an unreadable or empty reference folder before any model is loaded."""
    from adapt.references import load_reference_set

    with _clear_errors():
        load_reference_set(references)


def _one_process_only(command: str) -> None:
    """Refuse `command` under a launcher: every process would write the same reference
    images. personalize and finetune are the steps that train with several processes."""
    from adapt.training import launcher_world_size

    with _clear_errors():
        processes = launcher_world_size()
    if processes > 1:
        _keep_refusal_status()
        raise CommandError(
            f"adapt {command} runs in one process, not under a launcher of {processes} "
            "processes: synthesize the references in one process, then start `adapt "
            "personalize` and `adapt finetune` with the launcher (docs/adapt.md, Several GPUs)"
        )


def _check_prompt(prompt: str | None, token: str | None) -> None:
    from adapt.references import check_template

    if token and prompt is not None:
        with _clear_errors():
            check_template(prompt)


# -- option groups ----------------------------------------------------------------------------

_LABEL_OPTIONS = _options(
    click.option("--labels", type=click.Path(dir_okay=False),
                 help="Text file with one class name a line, in label order (label i = line "
                      "i+1). Names must be distinct, ignoring case."),
    click.option("--dataset",
                 help="Take the class names of a registered dataset instead (cifar10, "
                      "imagenet, pets, ... or folder:PATH); no data needed."),
)

_SYNTHESIS_OPTIONS = _options(
    click.option("--template", default=TEMPLATE,
                 help="Prompt C(c) for class c: exactly one '{}' where the name goes."),
    click.option("--shots", type=int, default=1, callback=_positive,
                 help="Images per class (the paper: 1; Tab. 9: 4 helps)."),
    click.option("--stage1", default=IF1,
                 help="Text-to-image base model (64x64): hub id or save_pretrained folder."),
    click.option("--stage2", default=IF2,
                 help="Super-resolution model (64 -> 256): hub id or save_pretrained folder."),
    click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
                 help="Precision of the IF models (fp16 on GPU halves the memory)."),
    click.option("--synthesis-batch", type=int, default=1, callback=_positive,
                 help="Images per IF-I/IF-II call (memory and speed only: every image keeps "
                      "its own seeded generator)."),
    click.option("--stage1-steps", type=int, default=None, callback=_positive,
                 help="Denoising steps of stage 1 [default: the pipeline's, 100]."),
    click.option("--stage2-steps", type=int, default=None, callback=_positive,
                 help="Denoising steps of stage 2 [default: the pipeline's, 50]."),
    click.option("--guidance-scale", type=float, default=None, callback=_non_negative,
                 help="Classifier-free guidance of both stages [default: the pipelines', "
                      "7.0 and 4.0; <= 1 turns it off]."),
)

_PERSONALIZE_OPTIONS = _options(
    click.option("--k", "k", type=float, default=1.8, callback=_non_negative,
                 help="Timestep correction: the low-resolution condition is noised at k*t "
                      "(Eq. 8; the paper's 1.8)."),
    click.option("--lam", type=float, default=0.01, callback=_non_negative,
                 help="Weight lambda of the classifier loss L_clf in Eq. 12 (0: plain "
                      "DreamBooth)."),
    click.option("--steps", type=int, default=500, callback=_positive,
                 help="Personalization steps (App. A.4: 500)."),
    click.option("--lr", type=float, default=1e-4, callback=_positive,
                 help="Personalization learning rate (App. A.4: 1e-4)."),
    click.option("--batch-size", type=int, default=24, callback=_positive,
                 help="Personalization batch size (App. A.4: 24, which was 4 GPUs x 6: "
                      "--batch-size 6 --grad-accum 4 is the same effective batch). Under a "
                      "launcher the global batch: each process takes batch / processes."),
    click.option("--grad-accum", type=int, default=1, callback=_positive,
                 help="Micro-batches of --batch-size per update (effective batch: their "
                      "product; the same gradient as one batch of that size)."),
    click.option("--rank", type=int, default=4, callback=_positive, help="LoRA rank."),
    click.option("--gradient-checkpointing", is_flag=True,
                 help="Recompute UNet activations in the backward pass (less memory)."),
    click.option("--use-8bit-adam", is_flag=True,
                 help="bitsandbytes' 8-bit AdamW (less optimizer memory; CUDA only)."),
)

_REFERENCES_OPTION = click.option(
    "--references", required=True, type=click.Path(file_okay=False),
    help="Reference folder from `adapt synthesize` (or an ImageFolder tree).",
)


def _classifier_choice(role: str) -> Callable:
    """--classifier (`role`: what the command does with it) and --classifier-checkpoint."""
    return _options(
        click.option("--classifier", default="clip-b32",
                     help=f"{role} (see `certify --list-models`)."),
        click.option("--classifier-checkpoint",
                     help="Pretrained weights of --classifier (open_clip tag or file, "
                          "torchvision weights) [default: the model's own]."),
    )


_DREAMBOOTH_PROMPT_OPTIONS = _options(
    click.option("--token", default="sks",
                 help="Unique identifier put in the prompt's '{}' (DreamBooth)."),
    click.option("--prompt", default=TEMPLATE,
                 help="Prompt template; the denoiser is conditioned on it with '{}' = --token."),
)


def _finetune_options(prefix: str) -> Callable:
    """--sigmas, --epochs, and the fine-tuning learning rate and batch size as
    --{prefix}lr and --{prefix}batch-size."""
    return _options(
        click.option("--sigmas", callback=_sigmas,
                     help="Comma-separated noise levels to fine-tune at (e.g. 0.25,0.5) "
                          "[default: random timesteps, as Algorithm 2]."),
        click.option("--epochs", type=int, default=10, callback=_positive,
                     help="Classifier fine-tuning epochs over the references (App. A.4: 10)."),
        click.option(f"--{prefix}lr", type=float, default=5e-7, callback=_positive,
                     help="Classifier fine-tuning learning rate (App. A.4: 5e-7)."),
        click.option(f"--{prefix}batch-size", type=int, default=256, callback=_positive,
                     help="Classifier fine-tuning batch size (App. A.4: 256; under a "
                          "launcher the global batch)."),
        click.option(f"--{prefix}grad-accum", type=int, default=1, callback=_positive,
                     help="Fine-tuning micro-batches per update (effective batch: "
                          f"--{prefix}batch-size x this)."),
    )


_RESOLUTION_OPTION = click.option(
    "--resolution", type=int, default=224, callback=_positive,
    help="Train at this image size: the evaluation size, as the paper's code (224; 96 "
         "for STL-10).",
)

_VARIANT_OPTION = click.option(
    "--variant", default=None,
    help="Checkpoint file variant, e.g. fp16 for DeepFloyd's half-precision files "
         "(*.fp16.safetensors).",
)

_TRAINING_OPTIONS = _options(
    click.option("--checkpoint-every", type=int, default=100, callback=_positive,
                 help="Save resumable training state every N steps (finetune also at "
                      "every epoch's end; both on Ctrl-C/SIGTERM)."),
    click.option("--keep-checkpoints", type=int, default=1, callback=_positive,
                 help="Checkpoints kept while training (all deleted once it completes)."),
    click.option("--mixed-precision", type=click.Choice(PRECISIONS), default="no",
                 help="accelerate's mixed precision of training (bf16 on A100/H100)."),
)

_RUNTIME_OPTIONS = _options(
    click.option("--seed", type=int, default=0, help="Seed of every random draw."),
    click.option("--device", default="auto",
                 help="cpu, cuda, cuda:1, ... (auto: cuda when available)."),
    click.option("--overwrite", is_flag=True,
                 help="Replace results of a run with other settings in --out (only the "
                      "files this command writes; an input inside --out is refused)."),
    click.option("--quiet", is_flag=True, help="No progress bars."),
)


@click.group("adapt", context_settings=CONTEXT)
def adapt_group() -> None:
    """Robustify a classifier for a new label set from text alone (Choi et al., ECCV
    2024, Sec. 3.2, Algorithm 2): no image of the task is needed, only its class names.

    \b
    synthesize   generate reference images per class with DeepFloyd IF
                 (IF-I-XL, then IF-II-L; 256x256; 1 per class by default)
    personalize  LoRA DreamBooth of the IF-II denoiser on the references with the
                 prompt C("sks"), plus lambda x the classifier's cross-entropy on the
                 one-step denoised image (Eq. 10-12)
    finetune     fine-tune the classifier (CLIP: both encoders) on denoised references
                 (Eq. 13), denoiser frozen
    run          all three into one folder, then print the `certify` command that
                 uses the results

    Every step resumes after an interruption and refuses (exit 2) an output folder
    holding a run with other settings unless --overwrite.
    """


@adapt_group.command(
    "synthesize", context_settings=CONTEXT,
    short_help="Generate reference images per class from the class names.",
)
@_LABEL_OPTIONS
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Reference folder: images/<label>/<shot>.png and manifest.json.")
@_SYNTHESIS_OPTIONS
@click.option("--resolution", type=int, default=256, callback=_positive,
              help="Side of the saved images (resized if the cascade's output differs).")
@_VARIANT_OPTION
@_RUNTIME_OPTIONS
def synthesize_command(**options: Any) -> None:
    """Generate a reference set from class names (Sec. 3.2, "Reference Set Synthesis").

    Each image is prompt C(c) through IF-I-XL (64x64) and IF-II-L (256x256), seeded
    per (seed, class, shot), so a rerun reproduces the set, and any subset of it.
    Existing images are kept: a rerun fills in what is missing, adds shots, or adds
    classes after the existing ones. The manifest records prompt, seed and model ids
    of every image.
    """
    _one_process_only("synthesize")
    classes = _class_names(options["labels"], options["dataset"])
    from cli.options import resolve_device  # loads torch: not for --help

    device = resolve_device(options["device"])
    out = _synthesize(classes, options, device, options["out"], options["resolution"])
    click.echo(f"reference set: {out} ({len(classes)} classes x {options['shots']} shots); "
               f"next: adapt personalize --references {shlex.quote(str(out))} --out LORA_DIR")


def _synthesize(classes: list[str], options: dict[str, Any], device: str, out: str,
                resolution: int | None) -> Path:
    from adapt.synthesize import image_relpath, synthesize

    wanted = [image_relpath(label, shot)
              for label in range(len(classes)) for shot in range(options["shots"])]
    present = sum((Path(out) / path).is_file() for path in wanted)
    with _clear_errors():
        result = synthesize(
            classes, out, template=options["template"], shots=options["shots"],
            stage1=options["stage1"], stage2=options["stage2"],
            resolution=resolution, seed=options["seed"], device=device,
            dtype=options["dtype"], steps1=options["stage1_steps"],
            steps2=options["stage2_steps"], guidance_scale=options["guidance_scale"],
            progress=not options["quiet"], variant=options["variant"],
            batch_size=options["synthesis_batch"], overwrite=options["overwrite"],
        )
    kept = 0 if options["overwrite"] else present
    click.echo(f"synthesize: {len(wanted) - kept} images generated, {kept} kept")
    return result


@adapt_group.command(
    "personalize", context_settings=CONTEXT,
    short_help="Personalize the IF-II denoiser (LoRA, classifier-guided).",
)
@_REFERENCES_OPTION
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="LoRA folder: pytorch_lora_weights.safetensors, adapt_config.json, "
                   "loss curve, checkpoints/.")
@click.option("--checkpoint", default=IF2,
              help="IF-II model to personalize: hub id or save_pretrained folder.")
@_classifier_choice("Frozen classifier of the L_clf term")
@_DREAMBOOTH_PROMPT_OPTIONS
@_PERSONALIZE_OPTIONS
@_RESOLUTION_OPTION
@_VARIANT_OPTION
@_TRAINING_OPTIONS
@_RUNTIME_OPTIONS
def personalize_command(**options: Any) -> None:
    """Classifier-guided personalization of the IF-II denoiser (Sec. 3.2, Eq. 10-12).

    LoRA DreamBooth of the IF-II UNet on the reference set with the prompt C(token):
    the noise-prediction loss L_diff with the low-resolution condition at level k*t,
    plus lambda x the frozen classifier's cross-entropy L_clf on the one-step denoised
    image (Eq. 9). Text encoder and classifier stay frozen. Paper defaults (App. A.4):
    500 steps, lr 1e-4, batch 24, lambda 0.01. The result loads into
    `certify --denoiser if2 --lora OUT --prompt PROMPT --token TOKEN`.
    """
    _check_references(options["references"])
    _check_prompt(options["prompt"], options["token"])
    device = _training_device(options["device"])
    out = _personalize(options, device, options["references"], options["out"])
    click.echo(f"LoRA weights: {out}")


def _training_device(device: str) -> str:
    """`--device` resolved; under a launcher with GPUs, probed on this process's own GPU
    (LOCAL_RANK), so that no process opens a CUDA context on GPU 0 it will not use."""
    import os

    import torch

    from cli.options import resolve_device

    local_rank = os.environ.get("LOCAL_RANK", "")
    if local_rank.isdigit() and device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(local_rank) % torch.cuda.device_count())
    return resolve_device(device)


def _train(train: Callable, config_type: type, options: dict[str, Any], device: str,
           references: str | Path, out: str | Path, **settings: Any) -> Path:
    """`train(config_type(...))` with the settings personalize and finetune both take from
    the options, and `settings` (the run's own); the output folder."""
    with _clear_errors():
        config = config_type(
            references=str(references), out=str(out), classifier=options["classifier"],
            classifier_options=_classifier_options(options["classifier_checkpoint"],
                                                   options.get("classifier_weights")),
            token=options["token"], prompt=options["prompt"], k=options["k"],
            lr=options["lr"], batch_size=options["batch_size"],
            grad_accum=options["grad_accum"], resolution=options.get("resolution"),
            variant=options["variant"], checkpoint_every=options["checkpoint_every"],
            keep_checkpoints=options["keep_checkpoints"], seed=options["seed"], device=device,
            mixed_precision=options["mixed_precision"], overwrite=options["overwrite"],
            **settings,
        )
        return Path(train(config, progress=not options["quiet"]))


def _personalize(options: dict[str, Any], device: str, references: str | Path,
                 out: str | Path) -> Path:
    from adapt.personalize import PersonalizeConfig, personalize

    return _train(
        personalize, PersonalizeConfig, options, device, references, out,
        checkpoint=options["checkpoint"], lam=options["lam"], steps=options["steps"],
        rank=options["rank"], gradient_checkpointing=options["gradient_checkpointing"],
        use_8bit_adam=options["use_8bit_adam"],
    )


@adapt_group.command(
    "finetune", context_settings=CONTEXT,
    short_help="Fine-tune the classifier on denoised references.",
)
@_REFERENCES_OPTION
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for classifier.safetensors, finetune_config.json, loss curve.")
@_classifier_choice("Classifier to fine-tune")
@click.option("--classifier-weights", type=click.Path(dir_okay=False),
              help="Start from these fine-tuned weights of --classifier (e.g. a torchvision "
                   "network whose head already has one output per class).")
@click.option("--denoiser", type=click.Choice(["if2", "dds"]), default="if2",
              help="Frozen denoiser: IF-II (Choi et al.), or a one-step DDPM (dds, needs "
                   "--sigmas; e.g. the bundled digits DDPM for the digits-* models).")
@click.option("--denoiser-checkpoint",
              help=f"Denoiser weights: hub id or save_pretrained folder [if2: {IF2}].")
@click.option("--lora", type=click.Path(file_okay=False),
              help="LoRA folder from `adapt personalize` (frozen) [default: none].")
@click.option("--token", default=None,
              help="Word for the prompt's '{}' [default: the one --lora records, else none].")
@click.option("--prompt", default=None,
              help="Denoiser prompt template [default: the one --lora records (`adapt "
                   "personalize` writes it), else the empty prompt].")
@click.option("--k", "k", type=float, default=1.8, callback=_non_negative,
              help="Timestep correction factor of the denoiser (Eq. 8).")
@_finetune_options("")
@click.option("--template", "templates", multiple=True,
              help="CLIP prompt template with '{}' (repeat for several) [default: the "
                   "classifier's own: CLIP's 80 ImageNet templates, as certify uses].")
@click.option("--text-batch-size", type=int, default=256, callback=_positive,
              help="CLIP prompts per text-encoder chunk with gradients (memory only).")
@_RESOLUTION_OPTION
@_VARIANT_OPTION
@_TRAINING_OPTIONS
@_RUNTIME_OPTIONS
def finetune_command(**options: Any) -> None:
    """Fine-tune the classifier on denoised references (Sec. 3.2, Eq. 13).

    Minimizes the classifier's cross-entropy on one-step denoised noisy references,
    the (personalized) denoiser frozen. CLIP: both encoders are tuned and the class
    embeddings rebuilt from the tuned text encoder (App. A.4: 10 epochs, lr 5e-7,
    batch 256). The result loads into `certify --classifier-weights
    OUT/classifier.safetensors`.
    """
    _check_references(options["references"])
    _check_prompt(options["prompt"], options["token"])
    device = _training_device(options["device"])
    out = _finetune(options, device, options["references"], options["out"], options["lora"])
    click.echo(f"classifier weights: {out / 'classifier.safetensors'}")


def _finetune(options: dict[str, Any], device: str, references: str | Path, out: str | Path,
              lora: str | Path | None) -> Path:
    from adapt.finetune import FinetuneConfig, finetune

    return _train(
        finetune, FinetuneConfig, options, device, references, out,
        templates=list(options.get("templates") or []) or None,
        denoiser=options.get("denoiser", "if2"),
        denoiser_checkpoint=options["denoiser_checkpoint"],
        lora=None if lora is None else str(lora), sigmas=options["sigmas"],
        epochs=options["epochs"], text_batch_size=options.get("text_batch_size", 256),
    )


@adapt_group.command(
    "run", context_settings=CONTEXT,
    short_help="Synthesize, personalize and fine-tune; print the certify command.",
)
@_LABEL_OPTIONS
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for references/, lora/ and classifier/.")
@_classifier_choice("Classifier to robustify")
@click.option("--sigma", type=float, default=0.5, callback=_positive,
              help="Noise level of the printed certify command (the paper: 0.25, 0.5, 1.0).")
@click.option("--checkpoint", default=IF2,
              help="IF-II model: personalized, then the denoiser of certify.")
@_DREAMBOOTH_PROMPT_OPTIONS
@_SYNTHESIS_OPTIONS
@_PERSONALIZE_OPTIONS
@_finetune_options("finetune-")
@click.option("--resolution", type=int, default=None, callback=_positive,
              help="Training size of personalization and fine-tuning [default: the "
                   "evaluation size, as the paper's code: 96 for --dataset stl10, else 224]. "
                   "References are synthesized at the cascade's 256.")
@_VARIANT_OPTION
@click.option("--protocol", type=click.Choice(["none", "choi2024"]), default="none",
              help="choi2024: train as the paper's code does for --dataset (its class names, "
                   "its one CLIP template, the IF-II prompt of its evaluation) and print a "
                   "`certify --protocol choi2024` command.")
@_TRAINING_OPTIONS
@_RUNTIME_OPTIONS
def run_command(**options: Any) -> None:
    """The whole chain (Algorithm 2): synthesize -> personalize -> finetune.

    Writes OUT/references, OUT/lora and OUT/classifier, then prints (and saves as
    OUT/certify_command.txt) the `certify` command that evaluates the robustified
    classifier on your data. Rerunning the same command resumes where it stopped.
    """
    _one_process_only("run")
    classes = _class_names(options["labels"], options["dataset"])
    templates, classes = _apply_protocol(options, classes)
    _check_prompt(options["prompt"], options["token"])
    from cli.options import resolve_device  # loads torch: not for --help

    device = resolve_device(options["device"])
    try:  # fail now, not after an hour of synthesis
        import adapt.finetune  # noqa: F401
        import adapt.personalize  # noqa: F401
    except ImportError as error:
        raise CommandError(f"adapt run needs adapt.personalize and adapt.finetune: {error}") \
            from error
    out = Path(options["out"]).expanduser()
    # The cascade's own size (256); both trainings resize to the training resolution.
    references = _synthesize(classes, options, device, str(out / "references"), None)
    resolution = options["resolution"] or _evaluation_resolution(options["dataset"])
    lora = _personalize({**options, "resolution": resolution}, device, references,
                        out / "lora")
    # Fine-tune with the templates certify will use: the protocol's, the dataset's, else
    # CLIP's default. One template under the protocol also bounds the text side's memory.
    if templates is None and options["dataset"] is not None and _accepts_templates(
        options["classifier"]
    ):
        from classifiers.datasets import dataset_templates

        with _clear_errors():
            templates = dataset_templates(options["dataset"])
    finetuned = {**options, "denoiser_checkpoint": options["checkpoint"], "denoiser": "if2",
                 "templates": templates, "resolution": resolution,
                 "lr": options["finetune_lr"], "batch_size": options["finetune_batch_size"],
                 "grad_accum": options["finetune_grad_accum"]}
    classifier = _finetune(finetuned, device, references, out / "classifier", lora)

    command = certify_command_line(
        options, lora=lora, weights=classifier / "classifier.safetensors",
        out=out / f"certify_sigma{options['sigma']:g}",
    )
    (out / "certify_command.txt").write_text(command + "\n", encoding="utf-8")
    click.echo("\ndone. Certify the robustified classifier on your data with:\n")
    click.echo(command)
    click.echo("")
    click.echo(_data_note(options["dataset"], classes))


def _apply_protocol(
    options: dict[str, Any], classes: list[str]
) -> tuple[list[str] | None, list[str]]:
    """Under --protocol choi2024: the CLIP templates and class names the paper's code uses
    for --dataset, and its IF-II prompt (the LoRA is trained on the prompt certify will
    condition on). Returns (templates or None, class names)."""
    if options["protocol"] == "none":
        return None, classes
    from classifiers.protocols import get_protocol

    if options["dataset"] is None:
        raise click.UsageError(f"--protocol {options['protocol']} needs --dataset")
    with _clear_errors():
        facts = get_protocol(options["protocol"]).for_dataset(options["dataset"])
    source = click.get_current_context().get_parameter_source("prompt")
    if source is click.core.ParameterSource.COMMANDLINE and options["prompt"] != facts.if2_template:
        raise click.UsageError(
            f"--prompt {options['prompt']!r} differs from --protocol {options['protocol']}'s "
            f"IF-II prompt {facts.if2_template!r}; drop one"
        )
    options["prompt"] = facts.if2_template
    return [facts.clip_template], [facts.name_rule(name) for name in classes]


def _evaluation_resolution(dataset: str | None) -> int:
    """The size certify evaluates at, which the paper's code also trains at."""
    from adapt.training import STL_RESOLUTION, TRAINING_RESOLUTION

    return STL_RESOLUTION if dataset == "stl10" else TRAINING_RESOLUTION


def _accepts_templates(name: str) -> bool:
    import classifiers
    from classifiers.registry import UnknownNameError

    try:
        return classifiers.CLASSIFIERS.accepts(name, "templates")
    except UnknownNameError:
        return False


def _data_note(dataset: str | None, classes: list[str]) -> str:
    if dataset is not None:
        if dataset.startswith("folder:"):
            return "the folder's classes are the labels the models were adapted to."
        return "replace DATA_ROOT with the folder holding the dataset (see certify --help)."
    note = ("replace IMAGES_DIR with an ImageFolder of your test images: one subfolder per "
            "class, named as in the labels file ('_' may stand for a space).")
    # ImageFolder numbers classes in sorted folder-name order; label i must be line i + 1.
    folders = [c.replace(" ", "_") for c in classes]
    if folders != sorted(folders):
        note += (" Subfolders are read in sorted order, but your labels file is not sorted: "
                 "sort it (and rerun) or certify with a dataset whose label order matches it.")
    return note


def _absolute_if_path(value: str) -> str:
    """Local paths become absolute, so the command runs from any folder; hub ids stay."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def certify_command_line(options: dict[str, Any], *, lora: Path, weights: Path,
                         out: Path) -> str:
    """The `certify` invocation that uses the adapted denoiser and classifier."""
    args = ["certify", "--model", options["classifier"]]
    if options["classifier_checkpoint"]:
        args += ["--classifier-checkpoint", _absolute_if_path(options["classifier_checkpoint"])]
    args += [
        "--classifier-weights", str(weights.resolve()),
        "--denoiser", "if2", "--denoiser-checkpoint", _absolute_if_path(options["checkpoint"]),
        "--lora", str(lora.resolve()), "--prompt", options["prompt"], "--token", options["token"],
    ]
    if options["k"] != 1.8:
        args += ["--k", f"{options['k']:g}"]
    args += ["--sigma", f"{options['sigma']:g}"]
    if options.get("protocol", "none") != "none":
        args += ["--protocol", options["protocol"]]
    dataset = options["dataset"]
    if dataset is None:
        args += ["--dataset", "folder:IMAGES_DIR"]
    elif dataset.startswith("folder:"):
        args += ["--dataset", "folder:" + _absolute_if_path(dataset[len("folder:"):])]
    else:
        args += ["--dataset", dataset, "--data-root", "DATA_ROOT"]
    args += ["--out", str(out.resolve())]
    return shlex.join(args)
