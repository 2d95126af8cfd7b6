"""One process of a launcher running the `adapt` command line (tests/test_adapt_distributed.py
starts two with `torch.distributed.run`, the launcher torchrun is).

argv: the folder of the tiny CLIP's config (`save_tiny_clip` wrote it), then the `adapt`
arguments. The tiny CLIP is registered with open_clip and as the classifier `tiny-clip`
(its two test templates) first, as the tests' own process does; the exit status is the
command's (2: refused).

`ADAPT_TEST_RANK1_ARGS`: arguments added to the command line of rank 1 only (a process
started with other settings).
`ADAPT_TEST_SIGTERM=RANK,CALL`: the process of rank RANK sends itself SIGTERM during its
classifier call CALL of `adapt finetune` (one call per micro-batch), as a scheduler's
preemption reaching one process would.
"""

from __future__ import annotations

import os
import signal
import sys
from functools import partial
from pathlib import Path

import torch


def main() -> None:
    torch.set_num_threads(1)
    import open_clip

    from classifiers import CLASSIFIERS
    from classifiers.clip import build_clip
    from classifiers.registry import Entry
    from cli.adapt import adapt_group
    from tests.tiny_classifiers import CLIP_TEMPLATES, TINY_ARCH

    models, *args = sys.argv[1:]
    # The config file the test wrote (`register_tiny_clip` would rewrite it, while the
    # other process may be reading it).
    open_clip.add_model_config(Path(models) / f"{TINY_ARCH}.json")
    arch = TINY_ARCH
    builder = partial(build_clip, "clip-b32", arch=arch, templates=list(CLIP_TEMPLATES))
    CLASSIFIERS._entries["tiny-clip"] = Entry("tiny-clip", builder, "tiny CLIP for tests")
    if os.environ.get("ADAPT_TEST_SIGTERM"):
        terminate_during_a_step(*map(int, os.environ["ADAPT_TEST_SIGTERM"].split(",")))
    if os.environ.get("RANK") == "1" and os.environ.get("ADAPT_TEST_RANK1_ARGS"):
        args += os.environ["ADAPT_TEST_RANK1_ARGS"].split()
    adapt_group.main(args, prog_name="adapt", standalone_mode=True)


def terminate_during_a_step(rank: int, call: int) -> None:
    import adapt.finetune as module

    if int(os.environ.get("RANK", "0")) != rank:
        return
    calls = {"n": 0}
    original = module.classifier_logits

    def logits(*args):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    module.classifier_logits = logits


if __name__ == "__main__":
    main()
