"""`--protocol` and `--timestep-rounding`: a paper's evaluation settings, one flag away.

A protocol (`classifiers.protocols`) fixes, per dataset, the class names, the one CLIP
template, the IF-II prompt template, the evaluation subset and the rounding of IF-II's
corrected timestep. Options it fixes may not be given with another value: such a
command is refused (exit 2, nothing written) rather than silently mixing the paper's
settings with others; the same value as the protocol's is accepted. The JSON records
the protocol and this rule.
"""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

from classifiers.protocols import PROTOCOLS, DatasetProtocol, Protocol, get_protocol
from cli.errors import CommandError
from denoisers.timesteps import TIMESTEP_ROUNDINGS

PROTOCOL_OPTIONS = [
    click.option("--protocol", default="none", show_default=True,
                 help="Evaluation protocol of a paper's code: choi2024 = Choi et al. (2024)'s "
                      f"class names, one CLIP template, IF-II prompt, every "
                      f"floor(len/500)-th example and reference rounding. Known: "
                      f"{', '.join(PROTOCOLS)}."),
    click.option("--timestep-rounding", type=click.Choice(TIMESTEP_ROUNDINGS), default=None,
                 help="if2: t' = k t as floor(k t) clamped to T-1 (floor, in IF-II's "
                      "training range) or the reference code's float k t clamped to T "
                      "(reference). [default: floor; reference under --protocol choi2024]"),
]


def given(name: str) -> bool:
    """Whether option `name` was set on the command line (or its environment variable)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                              ParameterSource.ENVIRONMENT)


def refuse_conflicts(protocol: Protocol, conflicts: dict[str, tuple[Any, Any]]) -> None:
    """Refuse explicit options whose value differs from the protocol's: {flag: (given, ours)}."""
    differing = {flag: pair for flag, pair in conflicts.items() if pair[0] != pair[1]}
    if differing:
        shown = "; ".join(
            f"{flag} {given_value!r} (the protocol's: {ours!r})"
            for flag, (given_value, ours) in differing.items()
        )
        raise CommandError(
            f"--protocol {protocol.name} fixes {', '.join(differing)}: drop "
            f"{'them' if len(differing) > 1 else 'it'} or drop --protocol ({shown})"
        )


def resolve_protocol(
    options: dict[str, Any]
) -> tuple[Protocol | None, DatasetProtocol | None]:
    """Check --protocol against the dataset and the explicit options; set what it fixes.

    Sets options["prompt"] to the protocol's IF-II template (the token fills its "{}",
    "" by default: Eq. 9's empty label) and options["timestep_rounding"]. Options that
    depend on the dataset's length (--skip) are checked by the caller.
    """
    denoiser = options.get("denoiser")
    if given("timestep_rounding") and denoiser != "if2":
        raise click.UsageError("--timestep-rounding applies to --denoiser if2 only")
    if options["protocol"] == "none":
        options["timestep_rounding"] = options["timestep_rounding"] or "floor"
        return None, None
    try:
        protocol = get_protocol(options["protocol"])
        facts = protocol.for_dataset(options["dataset"])
    except ValueError as error:
        raise CommandError(str(error)) from error
    conflicts: dict[str, tuple[Any, Any]] = {}
    if given("prompt"):
        conflicts["--prompt"] = (options["prompt"], facts.if2_template)
    if given("timestep_rounding"):
        conflicts["--timestep-rounding"] = (options["timestep_rounding"],
                                            protocol.timestep_rounding)
    if given("templates"):
        conflicts["--template"] = (list(options["templates"]), [facts.clip_template])
    if given("start"):
        conflicts["--start"] = (options["start"], 0)
    refuse_conflicts(protocol, conflicts)
    if denoiser == "if2":
        options["prompt"] = facts.if2_template
    options["timestep_rounding"] = protocol.timestep_rounding
    return protocol, facts
