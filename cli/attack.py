"""Console script `attack`: empirical robust accuracy, beside `certify`'s certified one.

Without --sigma it attacks the base classifier and scores its argmax (seed 004's "CLIP"
rows); with --sigma it attacks the smoothed classifier (SmoothAdv, or a library attack
on SmoothAdv's soft smoothed classifier) and decides with PREDICT on fresh noise, an
abstention counting as not robust ("CLIP-Smooth" and "Ours" rows). Same model, data,
denoiser, device, seed and result options as certify; the loop is
`smoothing.attack_runner.run_attack`.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any

import click
import torch

from classifiers.datasets import UnreadableImageError
from cli import distributed
from cli.errors import CommandError
from cli.main import (
    DTYPES,
    RECORDED_PACKAGES,
    ResultFile,
    _common_options,
    _first_image,
    guarded_run,
    set_up_run,
)
from cli.options import positive
from cli.protocol_options import given
from denoisers.purifiers import ATTACK_GRADIENTS, PURIFIERS, build_purifier
from denoisers.registry import CheckpointError
from smoothing.attack_runner import (
    THREAT_TOLERANCE,
    Attack,
    AttackOutsideThreatModelError,
    AttackSettings,
    base_margin,
    run_attack,
    smoothed_margin,
    with_restarts,
)
from smoothing.attacks import (
    EOT,
    NORMS,
    SmoothedSoftClassifier,
    ThreatModel,
    default_step_size,
    draw_noise,
    pgd,
    smoothadv,
)
from smoothing.core import NonFiniteOutputError, Smooth

__all__ = ["ATTACKS", "AUTOATTACKS", "attack_command", "parse_eps"]

AUTOATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "autoattack", "autoattack-rand")
ATTACKS: tuple[str, ...] = ("none", "pgd", "smoothadv", *AUTOATTACKS)

RESTART_RULE = (
    "all restarts run; the one of lowest margin log p_y - max_{c != y} log p_c is kept "
    "(base softmax for pgd; for smoothadv the soft smoothed classifier on m_test fresh "
    "draws of the attack's stream); the earlier one on ties"
)
STREAMS = {
    "0": "decision on the clean input", "1": "the attack", "2": "PREDICT on the attacked input",
    "3": "a random defense's own randomness",
}


def parse_eps(text: str) -> float:
    """eps as written: a decimal or a fraction such as 8/255, read exactly (Fraction) and
    then rounded once to the nearest float, so `8/255` is the float 8/255."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or a fraction such as 8/255, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"must be > 0, got {text}")
    eps = float(value)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{text} is not a positive finite float")
    return eps


def _eps_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    ctx.meta["attack.eps_text"] = value  # recorded as typed beside the float
    try:
        return parse_eps(value)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--eps") from error


SIGMA_HELP = (
    "Attack the smoothed classifier at this noise level (SmoothAdv; decision by PREDICT "
    "with --n and --alpha on fresh noise) [default: none: attack the base classifier and "
    "score its argmax]."
)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@_common_options(
    default_n=100, sigma_default=None, sigma_help=SIGMA_HELP,
    out_help="[default: runs/attack_MODEL[_DENOISER]_DATASET_SPLIT[_sigmaSIGMA]_ATTACK"
             "[_NORM_epsEPS]]",
)
@click.option("--attack", "attack_name", type=click.Choice(ATTACKS), default=None,
              help="none (x_adv = x), pgd (the base classifier), smoothadv (the "
                   "smoothed classifier; needs --sigma), or AutoAttack's apgd-ce, apgd-t, "
                   "autoattack (standard), autoattack-rand (needs the autoattack extra) "
                   "[default: pgd without --sigma, smoothadv with it].")
@click.option("--norm", type=click.Choice(NORMS), default="l2", help="Threat model's norm.")
@click.option("--eps", callback=_eps_option,
              help="Radius of the threat model, a number or a fraction (8/255) [required "
                   "unless --attack none].")
@click.option("--steps", type=click.IntRange(min=1), default=100, help="Attack iterations.")
@click.option("--step-size", type=float, default=None, callback=positive("step-size"),
              help="pgd/smoothadv step size [default: 4/3 * eps / steps, seed 004 App. A.3].")
@click.option("--restarts", type=click.IntRange(min=1), default=1,
              help="Attack restarts per example (pgd/smoothadv: all run, the one of lowest "
                   "margin is kept; AutoAttack: its own restarts).")
@click.option("--m-test", "m_test", type=click.IntRange(min=1), default=32,
              help="Noise draws of the soft smoothed classifier the attack differentiates "
                   "(seed 004: 32); needs --sigma.")
@click.option("--chunk", type=click.IntRange(min=1), default=None,
              help="Noise draws per forward pass in the attack, out of --m-test (memory, not "
                   "results) [default: all of them].")
@click.option("--purifier", type=click.Choice(PURIFIERS.names()), default=None,
              help="An empirical defense in front of --model (seeds 000-003, docs/purifiers.md); "
                   "exclusive with --denoiser and --sigma.")
@click.option("--gradient", type=click.Choice(ATTACK_GRADIENTS), default="exact",
              help="The purifier's backward pass: exact (autograd through everything), "
                   "official (what the authors' code back-propagates), bpda (identity), or "
                   "blind (attack --model alone, evaluate it purified).")
@click.option("--eot", type=click.IntRange(min=1), default=1,
              help="Average the attack's gradient over this many draws of a random purifier "
                   "(Athalye et al.'s EOT).")
@click.option("--purifier-option", "purifier_options", multiple=True, metavar="KEY=VALUE",
              help="A hyperparameter of the purifier (VALUE read as JSON, else as text), e.g. "
                   "steps=20 or checkpoint=path/to/model; repeat for several.")
def attack_command(**options: Any) -> None:
    """Attack each example and decide on the attacked input: empirical robust accuracy,
    an upper bound where a certificate is a lower one.

    Writes one row per example to OUT.tsv (idx label predict correct time clean_predict
    clean_correct l2 linf; predict = -1 when PREDICT abstains, which is not robust) and
    every setting to OUT.json. A rerun with the same settings resumes where it stopped.
    """
    attack_name, threat, attack_settings = _check_attack_options(options)
    purifier_options = _check_purifier_options(options)
    sigma = options["sigma"]
    suffix = f"_{attack_name}" + ("" if threat is None else f"_{threat.norm}_eps{threat.eps:g}")
    if options["purifier"] is not None:
        suffix = f"_{options['purifier']}_{options['gradient']}{suffix}"
    group = distributed.join(options)  # under torchrun: this rank's device
    setup = set_up_run("attack", options, stem_suffix=suffix)
    evaluated, attacked = setup.base, setup.base
    if options["purifier"] is not None:
        evaluated, attacked, record = _purified(setup.base, options, purifier_options,
                                                setup.device)
        setup.row_settings["purifier"] = record
    if threat is not None:
        _check_gradients(attacked, _first_image(setup.dataset, options), setup.device,
                         threat, attack_name)
    if sigma is None:  # PREDICT's settings: nothing decides by them without --sigma
        setup.row_settings.update(n=None, alpha=None, batch=None)
    setup.row_settings.update(attack_settings)
    setup.extra_record.update(chunk=options["chunk"], streams=STREAMS,
                              threat_tolerance=THREAT_TOLERANCE)
    merged_stem = distributed.shard(group, "attack", setup)  # this rank's share and shard
    results = ResultFile(
        setup.stem, "attack", setup.row_settings, overwrite=options["overwrite"],
        packages=RECORDED_PACKAGES, environment=setup.environment,
    )
    settings = AttackSettings(
        threat=threat, seed=options["seed"], device=setup.device, n=options["n"],
        alpha=options["alpha"], batch_size=options["batch"],
        autocast_dtype=DTYPES[options["dtype"]],
    )
    attack = _build_attack(attack_name, attacked, threat, options, attack_settings)

    def call() -> None:
        try:
            run_attack(
                evaluated, attack, setup.dataset, setup.indices, results, settings,
                smooth=setup.smooth, extra_record=setup.extra_record,
                progress=not options["quiet"],
                skip_errors=(UnreadableImageError,) if options["skip_unreadable"] else (),
            )
        except AttackOutsideThreatModelError as error:
            raise click.ClickException(f"{error} (a bug: please report it)") from error

    reported = distributed.run(group, lambda: guarded_run(results, call), "attack",
                               merged_stem, results, setup.extra_record)
    if reported is not None:  # None on torchrun ranks other than 0
        _report(reported, smoothed=sigma is not None)


def _check_attack_options(
    options: dict[str, Any]
) -> tuple[str, ThreatModel | None, dict[str, Any]]:
    """The attack's name, threat model and recorded settings; refuses what makes no sense."""
    sigma = options["sigma"]
    name = options["attack_name"] or ("pgd" if sigma is None else "smoothadv")
    if name == "pgd" and sigma is not None:
        raise click.UsageError(
            "--attack pgd with --sigma: PGD on the smoothed soft classifier is SmoothAdv; use "
            "--attack smoothadv, or drop --sigma to attack the base classifier"
        )
    if name == "smoothadv" and sigma is None:
        raise click.UsageError(
            "--attack smoothadv attacks a smoothed classifier: give --sigma (or use "
            "--attack pgd on the base classifier)"
        )
    if sigma is None:
        flags = [f for f in ("n", "alpha", "batch", "m_test", "chunk", "micro_batch")
                 if given(f)]
        if flags:
            shown = ", ".join("--" + f.replace("_", "-") for f in flags)
            raise click.UsageError(
                f"{shown} set PREDICT and the smoothed attack: they need --sigma"
            )
        if options["denoiser"] != "none":
            raise click.UsageError(
                "--denoiser needs --sigma: a denoiser is built for one noise level and is "
                "part of the smoothed classifier"
            )
    if name == "none":
        flags = [f for f in ("norm", "eps", "steps", "step_size", "restarts", "m_test", "chunk")
                 if given(f)]
        if flags:
            shown = ", ".join("--" + f.replace("_", "-") for f in flags)
            raise click.UsageError(f"--attack none takes no {shown}")
        return name, None, {
            "attack": name, "norm": None, "eps": None, "eps_text": None, "m_test": None,
            "steps": None, "step_size": None, "restarts": None, "restart_rule": None,
        }
    if options["eps"] is None:
        raise click.UsageError(f"--attack {name} needs --eps (the threat model's radius)")
    try:
        threat = ThreatModel(options["norm"], options["eps"])
    except ValueError as error:
        raise CommandError(str(error)) from error
    steps, restarts = options["steps"], options["restarts"]
    recorded: dict[str, Any] = {
        "attack": name, "norm": threat.norm, "eps": threat.eps,
        "eps_text": click.get_current_context().meta.get("attack.eps_text"),
        "m_test": options["m_test"] if sigma is not None else None,
        "steps": steps, "restarts": restarts,
    }
    if name in AUTOATTACKS:
        if given("step_size"):
            raise click.UsageError(f"--step-size does not apply to {name}: APGD adapts its own")
        autoattack_module = _autoattack_module()
        autoattack_module.require_autoattack()
        recorded.update(step_size=None, restart_rule="AutoAttack's own",
                        autoattack=autoattack_module.autoattack_settings(name, steps, restarts))
    else:
        recorded.update(
            step_size=options["step_size"] or default_step_size(threat.eps, steps),
            restart_rule=RESTART_RULE if restarts > 1 else None,
        )
    return name, threat, recorded


def _check_purifier_options(options: dict[str, Any]) -> dict[str, Any]:
    """--purifier-option KEY=VALUE pairs as keywords; refuses what cannot go with a purifier."""
    purifier_flags = [f for f in ("gradient", "eot", "purifier_options") if given(f)]
    if options["purifier"] is None:
        if purifier_flags:
            shown = ", ".join("--" + f.replace("_options", "_option").replace("_", "-")
                              for f in purifier_flags)
            raise click.UsageError(f"{shown} configure a purifier: give --purifier")
        return {}
    if options["denoiser"] != "none":
        raise click.UsageError("--purifier and --denoiser are exclusive: one defense at a time")
    if options["sigma"] is not None:
        raise click.UsageError(
            "--purifier with --sigma: the purifiers are empirical defenses evaluated on their "
            "own (seeds 000-003); drop --sigma"
        )
    parsed: dict[str, Any] = {}
    for pair in options["purifier_options"]:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}",
                                     param_hint="--purifier-option")
        if key in ("classifier", "gradient"):
            raise click.BadParameter(f"{key} is set by --model / --gradient, not here",
                                     param_hint="--purifier-option")
        try:
            parsed[key] = json.loads(text)
        except json.JSONDecodeError:
            parsed[key] = text
    return parsed


def _purified(
    classifier: torch.nn.Module, options: dict[str, Any], hyperparameters: dict[str, Any],
    device: str,
) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """(the model evaluated, the model attacked, the record) of --purifier.

    blind: the attack sees the classifier alone and the purified model is evaluated (its
    own backward is then never used: built with bpda, which needs no second-order graph).
    """
    gradient, eot = options["gradient"], options["eot"]
    try:
        purified = build_purifier(
            options["purifier"], classifier=classifier,
            gradient="bpda" if gradient == "blind" else gradient, device=device,
            **hyperparameters,
        )
    except (ValueError, CheckpointError, TypeError) as error:
        raise CommandError(f"--purifier {options['purifier']}: {error}") from error
    if gradient == "blind":
        if eot > 1:
            raise click.UsageError("--eot averages the purifier's randomness: not with blind")
        attacked = purified.classifier
    else:
        attacked = EOT(purified, eot) if eot > 1 else purified
        if purified.random and eot == 1:
            click.echo(f"note: {options['purifier']} is random; an attack without --eot sees "
                       "one draw of it per step", err=True)
    record = {
        "name": options["purifier"], "gradient": gradient, "eot": eot,
        "options": hyperparameters, "random": purified.random,
        # what the builder says decides its output; default=str for non-JSON values
        "settings": json.loads(json.dumps(purified.settings, default=str)),
    }
    return purified, attacked, record


def _autoattack_module():
    """cli.autoattack, imported only when an AutoAttack name is asked for (optional extra)."""
    try:
        import cli.autoattack as module
    except ModuleNotFoundError as error:
        if error.name != "cli.autoattack":
            raise
        raise CommandError(
            "AutoAttack is not part of this installation (cli/autoattack.py is missing); "
            "install the autoattack extra of a release that has it"
        ) from error
    return module


def _check_gradients(
    model: torch.nn.Module, image: torch.Tensor | None, device: str, threat: ThreatModel,
    name: str,
) -> None:
    """One gradient step on the first image before any file is written: a model computing
    under no_grad (or detaching) is refused here, with the library's message."""
    if image is None:
        return
    x = image.to(device).unsqueeze(0)
    try:
        pgd(model, x, torch.zeros(1, dtype=torch.long, device=device), threat, steps=1,
            random_start=False)
    except TypeError as error:
        raise CommandError(f"--attack {name} needs input gradients of the model: {error}") \
            from error
    except NonFiniteOutputError as error:
        raise CommandError(f"--attack {name}: {error} on the first image") from error


def _build_attack(
    name: str, model: torch.nn.Module, threat: ThreatModel | None, options: dict[str, Any],
    recorded: dict[str, Any],
) -> Attack:
    """The callable `attack(x, y, generator) -> x_adv` the runner calls per example."""
    if name == "none":
        return lambda x, y, generator: x.clone()
    sigma, m, chunk = options["sigma"], options["m_test"], options["chunk"]
    steps, restarts = recorded["steps"], recorded["restarts"]
    if name in AUTOATTACKS:

        def library_attack(x, y, generator):
            from cli.autoattack import autoattack

            target = model
            if sigma is not None:  # the soft smoothed classifier on noise of the attack stream
                target = SmoothedSoftClassifier(model, draw_noise(x, m, sigma, generator)[0],
                                                chunk)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                     device=generator.device))
            return autoattack(target, x, y, attack=name, norm=threat.norm, eps=threat.eps,
                              seed=seed, steps=steps, restarts=restarts)

        return library_attack
    step_size = recorded["step_size"]
    if name == "pgd":

        def once(x, y, generator):
            return pgd(model, x, y, threat, steps=steps, step_size=step_size,
                       generator=generator)

        margin = base_margin(model)
    else:

        def once(x, y, generator):
            return smoothadv(model, x, y, threat, sigma, m=m, steps=steps, step_size=step_size,
                             chunk=chunk, generator=generator)

        margin = smoothed_margin(model, sigma, m, chunk)
    return with_restarts(once, restarts, margin)


def _report(results: ResultFile, smoothed: bool) -> None:
    rows = list(results.done.values())
    if results.skipped:
        click.echo(f"skipped {len(results.skipped)} unreadable image(s), listed under "
                   f"'skipped' in {results.sidecar.name}", err=True)
    if not rows:
        click.echo(f"wrote {results.tsv} (no rows)")
        return
    total = len(rows)
    robust = sum(int(r["correct"]) for r in rows)
    clean = sum(int(r["clean_correct"]) for r in rows)
    click.echo(f"wrote {results.tsv} ({total} rows) and {results.sidecar.name}")
    line = f"empirical robust accuracy: {robust / total:.3f}, clean accuracy: {clean / total:.3f}"
    if smoothed:
        abstained = sum(int(r["predict"]) == Smooth.ABSTAIN for r in rows)
        line += f", abstained after the attack: {abstained} (not robust)"
    click.echo(line)
