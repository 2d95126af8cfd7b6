"""certify, predict and attack under `torchrun`: one shard per rank, merged by rank 0.

`torchrun --nproc-per-node N certify ...` starts N copies of the command with RANK,
WORLD_SIZE and LOCAL_RANK in their environment (multi-node torchrun with a rendezvous
sets the same variables). Each rank then

1. joins the process group (gloo, see `BACKEND`), and picks its device: `--device auto`
   or `cuda` becomes `cuda:LOCAL_RANK` on a machine with CUDA; any other `--device`
   (`cpu`, `cuda:3`) is used as given;
2. builds data and model as a one-process run would, and compares its settings with
   rank 0's (a hash of the row settings, the selection and --out, gathered over the
   group): any difference, or a result file that would be refused, stops every rank with
   one message and exit status 2 before any file is written;
3. computes its share `indices[rank::world_size]` into `OUT.rank{r}-of-{w}.tsv/.json`
   (the same ResultFile: its own lock, its own resume);
4. when all ranks are done, rank 0 merges the shards into `OUT.tsv/.json` in index order
   (`smoothing.shards.merge_shards`). A rerun resumes every shard and redoes the merge.

Without RANK/WORLD_SIZE in the environment nothing here runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist

from cli.errors import CommandError
from smoothing.runner import ResultFile, ResultFileError
from smoothing.shards import check_foreign_shards, merge_shards, shard_indices, shard_stem

# The ranks exchange only a few small Python objects (settings hashes, success flags), never
# tensors: gloo does that on CPU and GPU machines alike, over TCP between nodes, with no
# CUDA context of its own. nccl would add nothing here and cannot send CPU objects.
BACKEND = "gloo"
# The final gather waits for the slowest rank, which may be many hours behind one that
# resumed a nearly finished shard. A rank that dies does not hang the others: torchrun
# stops the whole group when one worker fails.
TIMEOUT = timedelta(days=7)


def _environment_rank() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment, or None outside it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as error:
        raise CommandError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {error}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise CommandError(f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}: not a rank")
    return rank, world, local


@dataclass
class ProcessGroup:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def join(cls) -> ProcessGroup | None:
        """Join the group torchrun started (None when not launched by torchrun)."""
        place = _environment_rank()
        if place is None:
            return None
        if not dist.is_initialized():
            dist.init_process_group(BACKEND, timeout=TIMEOUT)
        return cls(*place)

    def device(self, option: str) -> str:
        """--device auto or cuda means this rank's GPU, cuda:LOCAL_RANK, where CUDA exists."""
        if option in ("auto", "cuda") and torch.cuda.is_available():
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise CommandError(
                    f"rank {self.rank} has LOCAL_RANK {self.local_rank}, but this node has "
                    f"{count} GPU(s): start at most {count} processes per node "
                    "(--nproc-per-node), or give every rank the same --device cuda:K"
                )
            return f"cuda:{self.local_rank}"
        return option

    def gather(self, value: Any) -> list[Any]:
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def shard(self, mode: str, setup: Any) -> Path:
        """Turn a one-process RunSetup into this rank's share; returns the merged stem.

        Refuses (on every rank, before any file is written) a rank whose settings differ
        from rank 0's, and result files that this run would be refused at the end.
        """
        stem = setup.stem
        # Every rank records the device type: cuda:0 and cuda:1 draw the same noise.
        setup.row_settings["device"] = torch.device(setup.device).type
        selection = setup.extra_record.get("selection")
        agreed = {"mode": mode, "settings": setup.row_settings, "selection": selection,
                  "out": str(stem)}
        digest = hashlib.sha256(
            json.dumps(agreed, sort_keys=True, default=str).encode()
        ).hexdigest()
        everyone = self.gather((digest, agreed))
        differing = [rank for rank, (other, _) in enumerate(everyone) if other != everyone[0][0]]
        if differing:
            reference = everyone[0][1]
            first = everyone[differing[0]][1]
            changes = _differences(reference, first)
            raise CommandError(
                f"rank {differing[0]} (of ranks {differing}) was started with other settings "
                f"than rank 0 ({changes}); every rank of a torchrun must run the same command. "
                "Nothing was written."
            )
        setup.indices = shard_indices(setup.indices, self.rank, self.world_size)
        setup.stem = shard_stem(stem, self.rank, self.world_size)
        setup.extra_record["distributed"] = {
            "rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank,
            "host": socket.gethostname(), "device": setup.device, "backend": BACKEND,
        }
        return stem

    def check(self, shard: ResultFile, merged: ResultFile) -> None:
        """Open and close this rank's shard (and on rank 0 the merged result) as a run
        would, writing nothing; stop every rank if any of them would be refused."""
        problem = None
        try:
            if self.rank == 0:
                check_foreign_shards(merged.stem, self.world_size)
                merged.open({})
                merged.close(finished=False)
            shard.open({})
            shard.close(finished=False)
        except ResultFileError as error:
            problem = f"rank {self.rank}: {error}"
        problems = [p for p in self.gather(problem) if p is not None]
        if problems:
            raise CommandError(problems[0])

    def run_and_merge(
        self, call: Callable[[], Any], mode: str, stem: Path, shard: ResultFile,
        overwrite: bool, packages: Any, environment: dict[str, Any],
        extra_record: dict[str, Any],
    ) -> ResultFile:
        """Run this rank's shard, wait for all, and let rank 0 merge. Returns the merged file
        on rank 0, this rank's shard elsewhere. A failure on any rank fails every rank."""
        failure: BaseException | None = None
        try:
            call()
        except (click.ClickException, SystemExit, KeyboardInterrupt, Exception) as error:
            failure = error
        try:
            failed = [r for r, f in enumerate(self.gather(failure is not None)) if f]
        except Exception:  # the group is gone (another rank died): report our own outcome
            if failure is not None:
                raise failure from None
            raise
        if failure is not None:
            raise failure
        if failed:
            raise click.ClickException(
                f"rank(s) {failed} failed (see their messages); the rows of every shard are "
                f"kept and the same command resumes them. {stem}.tsv was not merged."
            )
        merged, problem = shard, None
        if self.rank == 0:
            extra = {key: value for key, value in extra_record.items() if key != "distributed"}
            try:
                merged = merge_shards(
                    stem, mode, shard.settings, self.world_size, overwrite=overwrite,
                    packages=packages, environment=environment, extra_record=extra,
                )
            except ResultFileError as error:
                problem = str(error)
        problems = [p for p in self.gather(problem) if p is not None]
        if problems:
            raise CommandError(f"merging the shards into {stem}.tsv: {problems[0]}")
        return merged

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _differences(reference: dict[str, Any], other: dict[str, Any], prefix: str = "") -> str:
    changed = []
    for key in sorted(set(reference) | set(other)):
        mine, theirs = reference.get(key, "<unset>"), other.get(key, "<unset>")
        if isinstance(mine, dict) and isinstance(theirs, dict):
            inner = _differences(mine, theirs, f"{prefix}{key}.")
            if inner:
                changed.append(inner)
        elif mine != theirs:
            changed.append(f"{prefix}{key}: {mine!r} on rank 0, {theirs!r} there")
    return "; ".join(changed)


def join(options: dict[str, Any]) -> ProcessGroup | None:
    """Join torchrun's group if launched by it (None otherwise) and set this rank's --device
    in `options`, before the models are built."""
    group = ProcessGroup.join()
    if group is not None:
        options["device"] = group.device(options["device"])
    return group


def shard(group: ProcessGroup | None, mode: str, setup: Any) -> Path | None:
    """Under torchrun, turn `setup` (once its row settings are final) into this rank's share
    and return the merged stem; without torchrun change nothing and return None."""
    if group is None:
        return None
    try:
        return group.shard(mode, setup)
    except BaseException:
        group.close()
        raise


def exit_cleanly(group: ProcessGroup | None) -> None:
    """Leave the process group (so torch does not warn at exit)."""
    if group is not None:
        group.close()


def run(
    group: ProcessGroup | None, call: Callable[[], Any], mode: str, stem: Path | None,
    results: ResultFile, extra_record: dict[str, Any],
) -> ResultFile | None:
    """Run `call` (the dataset loop writing `results`); under torchrun check every rank's
    files first, then merge. Returns the result to report: `results` without torchrun, the
    merged one on rank 0, None on the other ranks (rank 0 alone reports)."""
    if group is None:
        call()
        return results
    try:
        def copy(at: Path) -> ResultFile:
            return ResultFile(at, results.mode, dict(results.settings),
                              overwrite=results.overwrite, packages=results.packages,
                              environment=results.environment)

        group.check(copy(results.stem), copy(stem))
        merged = group.run_and_merge(
            call, mode, stem, results, results.overwrite, results.packages,
            results.environment, extra_record,
        )
        return merged if group.rank == 0 else None
    finally:
        exit_cleanly(group)
