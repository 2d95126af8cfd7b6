"""Console scripts `certify`, `predict` and `analyze`: the one place that wires the packages."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

import classifiers
import denoisers
from classifiers import custom
from classifiers.datasets import UnreadableImageError
from classifiers.weights_io import load_classifier_weights
from cli import distributed
from cli.analyze import analyze_command
from cli.errors import CommandError
from cli.options import (
    DENOISER_OPTIONS,
    DEVICE_OPTIONS,
    DTYPES,
    apply,
    build_denoiser,
    denoiser_choice,
    non_negative,
    positive,
    resolve_device,
)
from cli.protocol_options import PROTOCOL_OPTIONS, given, refuse_conflicts, resolve_protocol
from smoothing import sequential
from smoothing.core import NonFiniteOutputError, Smooth
from smoothing.runner import (
    ENGINE_PACKAGES,
    ResultFile,
    ResultFileError,
    RunSettings,
    run,
    select_indices,
)

__all__ = ["analyze_command", "certify_command", "predict_command"]

def _alpha(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.0 < value < 1.0:
        raise click.BadParameter(f"must lie in (0, 1), got {value}", param_hint="--alpha")
    return value


SIGMA_HELP = "Noise level: the std of the Gaussian added in [0, 1] pixel space."


def _common_options(
    default_n: int, sigma_default: float | None = 0.25, sigma_help: str = SIGMA_HELP,
    out_help: str = "[default: runs/MODE_MODEL[_DENOISER]_DATASET_SPLIT_sigmaSIGMA]",
) -> Callable:
    """Options shared by certify, predict and attack (attack: no default --sigma)."""
    options = [
        click.option("--model", default="digits", show_default=True,
                     help="Base classifier: a name (see --list-models), or your own "
                          "path/to/file.py:factory or package.module:factory, a callable "
                          "returning a torch.nn.Module from [B, C, H, W] in [0, 1] to logits."),
        click.option("--classifier-weights", type=click.Path(dir_okay=False),
                     help="Fine-tuned weights (safetensors) loaded into --model."),
        click.option("--classifier-checkpoint",
                     help="Pretrained weights of --model: an open_clip tag or file for clip-*, "
                          "a torchvision weights name or file for resnet*."),
        click.option("--template", "templates", multiple=True,
                     help="CLIP prompt template with '{}' for the class name; repeat to "
                          "average several [default: the dataset's templates]."),
        click.option("--dataset", default="digits", show_default=True,
                     help="Dataset name, or folder:PATH for an ImageFolder tree."),
        click.option("--split", default="test", show_default=True, help="Dataset split."),
        click.option("--data-root", type=click.Path(file_okay=False),
                     help="Folder holding the datasets (not needed for digits)."),
        click.option("--sigma", type=float, default=sigma_default,
                     show_default=sigma_default is not None, callback=positive("sigma"),
                     help=sigma_help),
        click.option("--n", "--N", "n", type=int, default=default_n, show_default=True,
                     callback=positive("n"),
                     help="Noise samples per example (--N as in Cohen et al.'s certify.py)."),
        click.option("--alpha", type=float, default=0.001, show_default=True, callback=_alpha,
                     help="Failure probability of the guarantee."),
        click.option("--batch", type=int, default=1000, show_default=True,
                     callback=positive("batch"), help="Noisy copies per forward pass."),
        click.option("--start", type=int, default=0, show_default=True,
                     help="First dataset index."),
        click.option("--skip", type=int, default=1, show_default=True,
                     help="Take every SKIP-th example from --start."),
        click.option("--max", "max_examples", type=int, default=None,
                     help="Stop after this many examples (a count; Cohen et al.'s --max is "
                          "a dataset index, see the README)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed; example i's noise depends only on (seed, i)."),
        *DEVICE_OPTIONS,
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads of torch (results do not depend on it) [default: "
                          "torch's, one per core]; fewer helps on a machine busy with "
                          "other work."),
        denoiser_choice(allow_none=True),
        *DENOISER_OPTIONS,
        click.option("--micro-batch", type=click.IntRange(min=1), default=None,
                     help="Images denoised and classified at once, out of each --batch "
                          "(results do not depend on it) [default: chosen from the GPU's free "
                          "memory; the whole batch on a CPU]. Needs --denoiser dds or if2."),
        click.option("--k", "k", type=float, default=1.8, show_default=True,
                     callback=non_negative("k"),
                     help="if2: timestep correction factor, t' = k * t (Eq. 8); 0 gives t' = 0."),
        *PROTOCOL_OPTIONS,
        click.option("--out", type=click.Path(dir_okay=False),
                     help=f"Result path stem: writes OUT.tsv and OUT.json {out_help}."),
        click.option("--overwrite", is_flag=True, help="Replace results made with other settings."),
        click.option("--skip-unreadable", is_flag=True,
                     help="Go on past an image file that cannot be decoded: it gets no row and "
                          "is listed under `skipped` in OUT.json (a rerun skips it again) "
                          "[default: stop there, naming the file]."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option("--list-models", is_flag=True, is_eager=True, expose_value=False,
                     callback=_list_names, help="List model and dataset names and exit."),
    ]
    return apply(options)


# What follows a registry prefix in --list-models (PATH unless named here).
_PREFIX_ARGUMENTS = {"open_clip:": "ARCH/TAG", "torchvision:": "NAME[/WEIGHTS]"}


def _list_names(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    registries = (("models", classifiers.CLASSIFIERS), ("datasets", classifiers.DATASETS))
    for title, registry in registries:
        click.echo(f"{title}:")
        for name in registry.names():
            shown = name + _PREFIX_ARGUMENTS.get(name, "PATH") if name.endswith(":") else name
            click.echo(f"  {shown:<22} {registry.get(name).description.strip().splitlines()[0]}")
    ctx.exit(0)


def _file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# Every library that decides a number of a result: the engine's, the models' and the data's
# (scikit-learn ships the digits and draws their split).
RECORDED_PACKAGES = (
    *ENGINE_PACKAGES, "torchvision", "diffusers", "transformers", "open_clip_torch", "peft",
    "scikit-learn", "safetensors",
)


def _weight_digests(module: torch.nn.Module | None) -> dict[str, str] | None:
    """sha256 of each file a model says it was loaded from (`weight_files`); None if unknown."""
    files = getattr(module, "weight_files", None)
    if not files:
        return None
    return {str(path): _file_digest(str(path)) for path in files}


def _git_commit() -> dict[str, Any] | None:
    """The commit of the checkout this code runs from, and whether it has local changes."""
    folder = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=folder, capture_output=True,
            text=True, timeout=10,
        )
        lines = commit.stdout.split()
        # Not a checkout, or an installed copy inside someone else's repository (a venv
        # in a project folder): that repository's commit says nothing about this code.
        if commit.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != folder:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None  # no git on this machine
    return {"commit": lines[1], "dirty": bool(status.stdout.strip())}


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    # platform.processor() is empty on most Linux systems; the kernel names the CPU there
    cpuinfo = Path("/proc/cpuinfo")
    if not platform.processor() and cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


@dataclass
class RunSetup:
    """What certify, predict and attack build from the shared options before running."""

    device: str
    dataset: Any
    classifier: torch.nn.Module  # --model as built
    base: torch.nn.Module  # what is smoothed and attacked: the classifier or denoise+classify
    smooth: Smooth | None  # None without --sigma (attack only)
    indices: list[int]
    stem: Path
    row_settings: dict[str, Any]  # everything that decides a row: the JSON's `settings`
    extra_record: dict[str, Any]  # recorded beside them, free to change on a resume
    environment: dict[str, Any]


def run_settings(mode: str, options: dict[str, Any], device: str) -> RunSettings:
    """The engine's settings for these command options: the one place their defaults are
    applied (packing on by default on CUDA only; bench.gpu_throughput runs through it)."""
    return RunSettings(
        mode=mode, n=options["n"], n0=options.get("n0") or 0, alpha=options["alpha"],
        batch_size=options["batch"], seed=options["seed"], device=device,
        early_exit=options.get("early_exit", False),
        radii=options["radii"] if options.get("sequential") else None,
        looks=options.get("looks", sequential.LOOKS),
        futility=options.get("futility", sequential.FUTILITY),
        pack=options["pack"] if options.get("pack") is not None
        else torch.device(device).type == "cuda",
    )


def _execute(mode: str, options: dict[str, Any]) -> None:
    """Build data, model and smoothed classifier from the options, then run."""
    # Under torchrun: this rank's device, share of the examples and shard file.
    group = distributed.join(options)
    setup = set_up_run(mode, options)
    setup.row_settings.update(_certify_settings(options))
    merged_stem = distributed.shard(group, mode, setup)
    results = ResultFile(
        setup.stem, mode, setup.row_settings, overwrite=options["overwrite"],
        packages=RECORDED_PACKAGES, environment=setup.environment,
    )
    settings = run_settings(mode, options, setup.device)
    # outside the settings: packing changes no example's draws, so a resume may change it
    setup.extra_record["examples_per_pass"] = settings.examples_per_pass()
    reported = distributed.run(group, lambda: guarded_run(results, lambda: run(
        setup.smooth, setup.dataset, setup.indices, results, settings,
        extra_record=setup.extra_record, progress=not options["quiet"],
        skip_errors=(UnreadableImageError,) if options["skip_unreadable"] else (),
    )), mode, merged_stem, results, setup.extra_record)
    if reported is not None:  # None on torchrun ranks other than 0
        _report(mode, reported)


def _parse_grid(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[float, ...] | None:
    """--radii as given: comma-separated, strictly increasing, >= 0 (0 is added if missing)."""
    if value is None:
        return None
    try:
        return sequential.check_radii([float(part) for part in value.split(",")])
    except ValueError as error:
        raise click.BadParameter(
            f"{value!r}: {error} (give increasing numbers >= 0 such as 0,0.25,0.5)"
        ) from None


def _certify_only(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """predict's hidden copies of certify's options: refused with one message when given."""
    if value not in (None, False):
        raise click.UsageError(
            f"--{param.name.replace('_', '-')} is a certify option: PREDICT draws no "
            "selection samples and certifies no radius"
        )
    return value


_SCALE_OPTIONS = [
    ("--radii", dict(callback=_parse_grid, metavar="R1,R2,...",
                     help="With --sequential: the L2 radii to certify at, increasing, >= 0 "
                          "(0 is always in the grid).")),
    ("--sequential", dict(is_flag=True,
                          help="Certify at the --radii grid with as few draws as the "
                               "statistics allow (a group-sequential test, docs/scale.md): the "
                               "radius column is the largest radius of the grid certified.")),
    ("--looks", dict(type=click.IntRange(min=1), default=sequential.LOOKS,
                     help="With --sequential: the most looks at the draws, each "
                          f"{sequential.GROWTH:g} times the one before, up to --n.")),
    ("--futility", dict(type=click.FloatRange(0, 1, min_open=True, max_open=True),
                        default=sequential.FUTILITY,
                        help=f"With --sequential: from {sequential.FUTILITY_FROM} draws on, "
                             "give a radius up when the upper confidence bound at this level "
                             "falls below its threshold, or when even at that bound the "
                             "remaining draws reach a claim with less than this probability "
                             "(costs power, never validity).")),
    ("--early-exit", dict(is_flag=True,
                          help="Skip the n estimation draws of an example whose selection "
                               "draws guess a class other than its label: it is not certified "
                               "either way (row: predict = the guess, radius 0, correct 0). The "
                               "analyze table is unchanged.")),
]


_PACK_OPTION = click.option(
    "--pack/--no-pack", default=None,
    help="Fill each forward pass with the draws of several examples when an example's draws "
         "fill less than --batch (each example's noise is unchanged; docs/scale.md) "
         "[default: on a GPU, where small batches leave it idle; not on a CPU, where it "
         "measured slower].")


def _scale_options(hidden: bool) -> Callable:
    if hidden:
        return apply([
            click.option(flag, **{k: v for k, v in spec.items() if k in ("is_flag", "metavar")},
                         default=None, hidden=True, expose_value=False, callback=_certify_only)
            for flag, spec in _SCALE_OPTIONS
        ])
    return apply([click.option(flag, **spec) for flag, spec in _SCALE_OPTIONS])


def _check_scale_options(options: dict[str, Any]) -> None:
    """--radii, --looks and --futility mean something with --sequential only."""
    if options["sequential"] and options["radii"] is None:
        raise click.UsageError("--sequential needs --radii (e.g. --radii 0,0.25,0.5,0.75,1.0)")
    if not options["sequential"]:
        for name in ("radii", "looks", "futility"):
            if given(name):
                raise click.UsageError(
                    f"--{name} applies with --sequential only (a standard run certifies one "
                    "radius per example; analyze --radii tabulates it at any radii)"
                )


def _certify_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The settings of --early-exit and --sequential; none when off, so that runs made
    before these options existed still resume."""
    settings: dict[str, Any] = {}
    if options.get("early_exit"):
        settings["early_exit"] = True
    if options.get("sequential"):
        p_thresholds = sequential.thresholds(options["radii"], options["sigma"])
        plan = sequential.design(
            options["n"], options["alpha"], tuple(float(t) for t in p_thresholds),
            options["looks"], options["futility"],
        )
        settings["sequential"] = {
            "radii": list(options["radii"]), "looks": list(plan.looks),
            "spent": [list(row) for row in plan.spent],
            "counts": [list(row) for row in plan.counts],
            "futility": plan.futility, "futility_from": plan.futility_from,
            # files made under an earlier design or rule are refused on resume
            "boundary_rule": sequential.BOUNDARY_RULE,
            "futility_rule": sequential.FUTILITY_RULE,
        }
    return settings


def set_up_run(mode: str, options: dict[str, Any], stem_suffix: str = "") -> RunSetup:
    """Check the shared options, build data and models, name the result and its settings.

    Bad input is a CommandError (exit 2) before any file is touched. Without --sigma (the
    attack command only) nothing is smoothed: `smooth` is None. `stem_suffix` ends the
    default --out.
    """
    for name in ("start", "skip", "max_examples"):
        minimum = 0 if name == "start" else 1
        if options[name] is not None and options[name] < minimum:
            flag = "--max" if name == "max_examples" else f"--{name}"
            raise click.BadParameter(f"must be >= {minimum}", param_hint=flag)
    if options["seed"] < 0:  # numpy's SeedSequence, which derives each example's seed
        raise click.BadParameter("must be >= 0", param_hint="--seed")
    device = resolve_device(options["device"])
    if options["threads"] is not None:
        torch.set_num_threads(options["threads"])
    protocol, _ = resolve_protocol(options)

    try:
        if protocol is None:
            dataset = classifiers.build_dataset(
                options["dataset"], split=options["split"], data_root=options["data_root"]
            )
        else:
            dataset = protocol.build_dataset(
                options["dataset"], split=options["split"], data_root=options["data_root"]
            )
            skip = protocol.subsample_skip(len(dataset))
            if given("skip"):
                refuse_conflicts(protocol, {"--skip": (options["skip"], skip)})
            options["skip"] = skip
        weights = options["classifier_weights"]
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"--classifier-weights {weights}: no such file")
        model, model_source = _build_model(options, dataset, device)
        base, denoiser_settings = _with_denoiser(model, options, device)
        smooth = None
        if options["sigma"] is not None:
            smooth = Smooth(
                base, len(dataset.classes), options["sigma"], DTYPES[options["dtype"]]
            )
        indices = select_indices(
            len(dataset), options["start"], options["skip"], options["max_examples"]
        )
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise CommandError(str(error)) from error
    except KeyboardInterrupt:  # Ctrl-C while a large model loads: one line, not a traceback
        click.echo("\ninterrupted during start-up: nothing was written", err=True)
        sys.exit(130)

    denoiser = "" if options["denoiser"] == "none" else f"_{options['denoiser']}"
    dataset_name = options["dataset"].replace(":", "_").replace("/", "_")
    model_name = options["model"].replace(":", "_").replace("/", "_")
    sigma = "" if options["sigma"] is None else f"_sigma{options['sigma']:g}"
    stem = options["out"] or (
        f"runs/{mode}_{model_name}{denoiser}_{dataset_name}_{options['split']}{sigma}"
        f"{stem_suffix}"
    )
    stem = Path(stem)
    if stem.suffix in (".tsv", ".json"):
        stem = stem.with_suffix("")
    row_settings = {
        key: options[key]
        for key in ("model", "dataset", "split", "sigma", "n", "alpha", "batch", "seed", "dtype",
                    "classifier_checkpoint", "templates")
    }
    row_settings.update(
        n0=options.get("n0"), device=device,
        classifier_weights=options["classifier_weights"],
        classifier_weights_sha256=_file_digest(options["classifier_weights"]),
        denoiser=denoiser_settings,
        protocol=None if protocol is None else protocol.record(options["dataset"], len(dataset)),
    )
    if model_source is not None:  # only then: runs made before this key existed still resume
        row_settings["model_source"] = model_source
    selection = {key: options[key] for key in ("start", "skip", "max_examples")}
    # Outside the settings: results do not depend on the micro-batch, so a resume with
    # another one is allowed. A size halved after running out of memory is not recorded.
    micro_batch = None if options["denoiser"] == "none" else options["micro_batch"] or "auto"
    extra_record = {
        "selection": selection, "data_root": options["data_root"], "micro_batch": micro_batch,
        "threads": torch.get_num_threads(),
        "weights_sha256": {
            "classifier": _weight_digests(model),
            "denoiser": _weight_digests(getattr(base, "denoiser", None)),
        },
    }
    return RunSetup(
        device=device, dataset=dataset, classifier=model, base=base, smooth=smooth,
        indices=indices, stem=stem, row_settings=row_settings, extra_record=extra_record,
        environment={"device_name": _device_name(device), "git": _git_commit()},
    )


def guarded_run(results: ResultFile, call: Callable[[], Any]) -> None:
    """Run `call` (a dataset loop writing `results`), turning its failures into one message:
    bad input exit 2, a model failing exit 1, Ctrl-C exit 130; finished rows are kept."""
    try:
        call()
    except ResultFileError as error:
        raise CommandError(str(error)) from error
    except ValueError as error:  # bad input met while running (e.g. NaN in an image)
        raise CommandError(f"{error}; {_kept(results)}") from error
    except NonFiniteOutputError as error:
        raise click.ClickException(f"{error}; {_kept(results)}") from error
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted: {len(results.done)} rows are kept in {results.tsv}; "
            "the same command resumes from there", err=True,
        )
        sys.exit(130)  # the shell's code for a run stopped by Ctrl-C


def _build_model(
    options: dict[str, Any], dataset: Any, device: str
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The base classifier of --model, and a record of its source for a file/module factory."""
    name = options["model"]
    class_names = list(dataset.classes)
    prefixes = [entry for entry in classifiers.CLASSIFIERS.names() if entry.endswith(":")]
    if not custom.is_factory_reference(name, prefixes):
        model = classifiers.build_classifier(
            name, class_names=class_names, sigma=options["sigma"],
            **_classifier_options(options, dataset, device),
        )
        source = None
        if name.startswith("cohen:"):  # the checkpoint is the whole model: record which one
            source = {"checkpoint": name.removeprefix("cohen:"),
                      "checkpoint_sha256": _file_digest(name.removeprefix("cohen:"))}
        model = model.to(device).eval()
        image = _first_image(dataset, options)
        if image is not None:
            _check_images_fit(model, image, options, device)
        return model, source
    if options["classifier_checkpoint"] or options["templates"]:
        raise click.UsageError(
            f"--classifier-checkpoint and --template do not apply to --model {name}; "
            "its factory builds the whole model"
        )
    model, source = custom.build_from_factory(
        name, class_names=class_names, sigma=options["sigma"], device=device
    )
    if options["classifier_weights"] is not None:
        load_classifier_weights(model, options["classifier_weights"])
    image = _first_image(dataset, options)
    if image is not None:
        _check_images_fit(model, image, options, device)
        custom.check_output_shape(model, image.to(device), len(class_names), name)
    return model, source


def _first_image(dataset: Any, options: dict[str, Any]) -> torch.Tensor | None:
    """The first image of the dataset for the start-up checks (the first readable one
    with --skip-unreadable); None for an empty dataset."""
    for index in range(len(dataset)):
        try:
            return dataset[index][0]
        except UnreadableImageError:
            if not options["skip_unreadable"]:
                raise
    return None


def _check_images_fit(
    model: torch.nn.Module, image: torch.Tensor, options: dict[str, Any], device: str
) -> None:
    """Refuse, before any file is written, a dataset whose images the model cannot take.

    One clean forward pass of the first image; when it fails and the model's first
    convolution takes another number of channels (RGB images for a greyscale model, or the
    reverse), the message says what the model expects.
    """
    try:
        with torch.inference_mode():
            model(image.unsqueeze(0).to(device))
        return
    except Exception as error:  # any layer may be the one that fails
        failure = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    shape = "x".join(str(size) for size in image.shape)
    message = (
        f"--model {options['model']} cannot take the images of --dataset {options['dataset']} "
        f"(channels x height x width {shape})"
    )
    if conv is not None and conv.in_channels != image.shape[0]:
        kind = {1: "greyscale (1-channel)", 3: "RGB (3-channel)"}
        message += (
            f": it expects {kind.get(conv.in_channels, f'{conv.in_channels}-channel')} images, "
            f"the dataset holds {kind.get(image.shape[0], f'{image.shape[0]}-channel')} ones"
        )
    raise CommandError(f"{message} ({failure})")


def _classifier_options(options: dict[str, Any], dataset: Any, device: str) -> dict[str, Any]:
    """Keyword options for the classifier builder, from the command line and the dataset."""
    name = options["model"]
    built: dict[str, Any] = {"weights": options["classifier_weights"], "device": device}
    given = {"pretrained": options["classifier_checkpoint"], "templates": options["templates"]}
    for option, value in given.items():
        if value and not classifiers.CLASSIFIERS.accepts(name, option):
            flag = {"pretrained": "--classifier-checkpoint", "templates": "--template"}[option]
            raise click.UsageError(f"{flag} does not apply to --model {name}")
    if options["classifier_checkpoint"]:
        built["pretrained"] = options["classifier_checkpoint"]
    templates = list(options["templates"]) or getattr(dataset, "templates", None)
    if templates and classifiers.CLASSIFIERS.accepts(name, "templates"):
        built["templates"] = templates
    return built


def _with_denoiser(
    classifier: torch.nn.Module, options: dict[str, Any], device: str
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The base classifier to smooth: the classifier itself, or denoise-then-classify."""
    if options["denoiser"] == "none":
        if options["denoiser_checkpoint"] or options["lora"] or options["variant"]:
            raise click.UsageError(
                "--denoiser-checkpoint, --lora and --variant need --denoiser dds or if2"
            )
        if options["allow_untrained_sigma"]:
            raise click.UsageError("--allow-untrained-sigma applies to --denoiser ffdnet only")
        if options["micro_batch"] is not None:
            # refused, not ignored: without a denoiser --batch is already the forward pass
            raise click.UsageError("--micro-batch needs a --denoiser; use --batch")
        return classifier, None
    denoiser = build_denoiser(options, options["sigma"], options["k"], device)
    base = denoisers.DenoiseAndClassify(
        denoiser, classifier, options["sigma"], micro_batch=options["micro_batch"]
    )
    return base.to(device).eval(), {"name": options["denoiser"], **denoiser.settings()}


def _kept(results: ResultFile) -> str:
    if results.done:
        return f"rows so far are kept in {results.tsv}"
    return "nothing was written"  # failed before its first row: ResultFile wrote no file


def _report(mode: str, results: ResultFile) -> None:
    rows = list(results.done.values())
    total = len(rows)
    skipped = results.skipped
    if skipped:
        click.echo(f"skipped {len(skipped)} unreadable image(s), listed under 'skipped' in "
                   f"{results.sidecar.name}; they count in no accuracy below", err=True)
    if total == 0:
        click.echo(f"wrote {results.tsv} (no rows)")
        return
    correct = sum(int(r["correct"]) for r in rows)
    abstained = sum(int(r["predict"]) == Smooth.ABSTAIN for r in rows)
    click.echo(f"wrote {results.tsv} ({total} rows) and {results.sidecar.name}")
    if mode == "certify":
        click.echo(f"certified accuracy at radius 0: {correct / total:.3f}, abstained: {abstained}")
        click.echo(f"for ACR and curves: analyze {results.tsv} --plot {results.stem}")
    else:
        clean = sum(int(r["clean_correct"]) for r in rows)
        click.echo(
            f"smoothed accuracy: {correct / total:.3f}, abstained: {abstained}, "
            f"empirical clean accuracy (abstentions scored by the base classifier): "
            f"{clean / total:.3f}"
        )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@_common_options(default_n=10_000)
@click.option("--n0", "--N0", "n0", type=int, default=100, callback=positive("n0"),
              help="Noise samples that select the top class before it is bounded "
                   "(--N0 as in Cohen et al.'s certify.py).")
@_scale_options(hidden=False)
@_PACK_OPTION
def certify_command(**options: Any) -> None:
    """Certify each example: a class and an L2 radius within which the smoothed
    classifier's prediction provably cannot change, with probability >= 1 - alpha
    over the noise (Cohen et al., 2019, CERTIFY).

    Writes one row per example to OUT.tsv (idx label predict radius correct time;
    predict = -1 when it abstains) and the settings to OUT.json. A rerun with the
    same settings resumes where it stopped. With no options it certifies the
    bundled digits test split with the bundled model.

    With --sequential --radii R1,R2,... the radius column is the largest radius of that
    grid certified (analyze then reports a grid-ACR).
    """
    _check_scale_options(options)
    _execute("certify", options)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@_common_options(default_n=100)
@_scale_options(hidden=True)
@_PACK_OPTION
def predict_command(**options: Any) -> None:
    """Predict with the smoothed classifier (Cohen et al., 2019, PREDICT): the top
    class under noise if a binomial test separates it from the runner-up at level
    alpha, otherwise abstain. Default n = 100 as in the evaluation protocol of
    Choi et al. (2024, App. A.3).

    Reports the smoothed accuracy and the empirical clean accuracy, where an
    abstained example is scored by the base classifier's clean prediction.
    """
    _execute("predict", options)
