"""What `personalize` and `finetune` share: seeding, output folders, checkpoints, logs, plots.

- Seeding: `seed_everything` seeds Python, NumPy and torch once per run; the draws of a
  training step come from `step_generator(seed, stream, step)`, a generator of its own
  for every (seed, purpose, step), so step s draws the same batch, timesteps and noise
  whether or not the run was interrupted before it.
- `RunFolder`: an output folder belongs to one run. A folder holding none of the run
  files (`RUN_FILES`) starts a fresh run; one holding this run (same kind, same settings)
  resumes from its last checkpoint, or is left as it is when complete; anything else
  (other settings, another kind of run, weights without their settings file) is refused
  with one `AdaptError` and not touched, unless `overwrite`, which deletes the run files
  (and only those) and starts afresh.
  The settings include a fingerprint of the reference set's content (class names, image
  files' bytes: `adapt.references.reference_fingerprint`), so a changed set (a class
  added, an image replaced) is another run: refused, never resumed or returned as done.
  No input of a run (references, LoRA, checkpoints, weights) may be the output folder
  or one of its run files: `overwrite` would delete what the run then reads.
- `CheckpointStore`: `checkpoints/step_N/` holds the trained tensors as safetensors and
  the rest of the training state (optimizer, learning-rate schedule, RNG states, step)
  as a torch file read back with `weights_only=True`. Written to a temporary folder and
  renamed, so an interruption while saving leaves the previous checkpoint usable. The
  newest `keep_checkpoints` are kept while running; all are deleted once the run is
  complete (the weights file is the result).
- Files are written through temporary files and renames, with the modes the umask
  gives (`honour_umask`: 0644 files and 0755 folders under umask 022), not 0600.
- `LossLog`: `loss_log.tsv`, one row per step, appended and flushed row by row; on
  resume, rows after the checkpoint's step are dropped (they are recomputed).
- `plot_loss_curve`: the log as a PNG (matplotlib's object API with the Agg canvas: no
  pyplot, no global backend switch).
- `progress_bar`: tqdm with the loss terms as postfix.
- `make_accelerator`: an `accelerate.Accelerator` for one device and mixed precision, or,
  under a launcher (`WORLD_SIZE` > 1: `torchrun`, `accelerate launch`), the distributed one
  (gloo on CPUs, nccl with a GPU per process). Several processes: `batch_size` is the
  global batch and each process trains its block of it (`process_share`: the same
  `stream_batch` indices and `step_generator` draws as one process, sliced), the trained
  module runs under DDP (`data_parallel`), only the main process writes (`open_run`
  opens the folder and tells the others; logs, checkpoints, weights), a signal reaching
  one process stops all after the same step (`agree_on_signal`).
- Settings both configs share: `check_training_settings` (folders, k, optimizer,
  schedule, checkpoints, seed, resolution, precision, classifier options) and
  `result_settings` (the settings a resumed run must repeat).
- The loop: `Optimization` (backward, clipping, AdamW, schedule; its checkpoint state),
  `train_steps` (resume, then step, log, show progress and checkpoint), `finish_run`
  (plot, final losses, the folder's record marked complete, checkpoints pruned).
  Gradient accumulation (`grad_accum` G): an update is G backward passes over G
  micro-batches of `batch_size`, each loss divided by G; micro-batch m of step s is
  batch s G + m of the stream (`stream_batch`), and the per-image draws of step s are
  made for all G x batch_size images at once and sliced, so G micro-batches of b give
  the same gradient (to float rounding) as one batch of G b. Checkpoints are written
  every `checkpoint_every` steps, at the end of every epoch when the caller gives
  `epoch_steps`, and when SIGINT or SIGTERM arrives (`DeferredSignals`: the step in
  progress is finished, a checkpoint written, then the signal is delivered as before).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapt.errors import AdaptError

CHECKPOINTS = "checkpoints"
LOSS_LOG = "loss_log.tsv"
LOSS_CURVE = "loss_curve.png"
# Every file a personalize or finetune run writes into its folder. The two kinds share
# `checkpoints/`, the log and the plot, so one folder can hold one run only.
RUN_FILES = (
    "adapt_config.json",
    "finetune_config.json",
    "pytorch_lora_weights.safetensors",
    "classifier.safetensors",
    CHECKPOINTS,
    LOSS_LOG,
    LOSS_CURVE,
)
# mixed_precision -> dtype of the frozen weights (trained weights stay in float32).
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISION = tuple(WEIGHT_DTYPES)
LR_SCHEDULERS = ("cosine", "constant")
# Settings of either run that do not change its result: a run may resume with other values.
NOT_RESULT_SETTINGS = (
    "overwrite", "device", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing",
    "denoise_batch_size", "text_batch_size",
)
# The paper's code trains at the evaluation size: 224 x 224 crops, 96 x 96 for STL-10.
TRAINING_RESOLUTION = 224
STL_RESOLUTION = 96

# Streams of `step_generator`: which draw a generator is for.
STREAM_ORDER = 0  # the order of the reference images in one epoch
STREAM_STEP = 1  # timesteps, noise and noise levels of one step


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Versions of the packages a training result depends on."""
    import platform

    versions = {"python": platform.python_version()}
    for name in (
        "robustify", "torch", "torchvision", "diffusers", "transformers", "peft",
        "accelerate", "open_clip_torch", "numpy",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# -- settings -------------------------------------------------------------------------


def check_number(name: str, value: Any, *, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise AdaptError(f"{name} must be a finite number {relation} {minimum:g}, got {value!r}")


def check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise AdaptError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_training_settings(config: Any) -> None:
    """Raise `AdaptError` for a setting no run could use, among those both configs have:
    references, out, k, lr, weight_decay, max_grad_norm, batch_size, grad_accum,
    checkpoint_every, keep_checkpoints, seed, resolution, mixed_precision, lr_scheduler
    and classifier_options."""
    if not str(config.references).strip():
        raise AdaptError("references: give the reference set folder")
    if not str(config.out).strip():
        raise AdaptError("out: give an output folder")
    check_number("k", config.k, minimum=0.0)
    check_number("lr", config.lr, minimum=0.0, strict=True)
    check_number("weight_decay", config.weight_decay, minimum=0.0)
    if config.max_grad_norm is not None:
        check_number("max_grad_norm", config.max_grad_norm, minimum=0.0, strict=True)
    check_int("batch_size", config.batch_size, minimum=1)
    check_int("grad_accum", config.grad_accum, minimum=1)
    check_int("checkpoint_every", config.checkpoint_every, minimum=0)
    check_int("keep_checkpoints", config.keep_checkpoints, minimum=1)
    check_int("seed", config.seed, minimum=0)
    if config.resolution is not None:
        check_int("resolution", config.resolution, minimum=1)
    if config.mixed_precision not in MIXED_PRECISION:
        raise AdaptError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
            f"got {config.mixed_precision!r}"
        )
    if config.lr_scheduler not in LR_SCHEDULERS:
        raise AdaptError(
            f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {config.lr_scheduler!r}"
        )
    if not isinstance(config.classifier_options, dict):
        raise AdaptError("classifier_options must be a dict of builder options")


def result_settings(config: Any) -> dict[str, Any]:
    """The settings that decide a run's result (compared when resuming), paths resolved."""
    settings = dataclasses.asdict(config)
    for name in NOT_RESULT_SETTINGS:
        settings.pop(name, None)
    for name in ("references", "checkpoint", "denoiser_checkpoint", "lora"):
        value = settings.get(name)
        if value and Path(str(value)).expanduser().exists():
            settings[name] = str(Path(str(value)).expanduser().resolve())
    return settings


# -- seeding --------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def step_seed(seed: int, *key: int) -> int:
    """A 64-bit seed for (seed, *key), independent across keys (NumPy's SeedSequence)."""
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def step_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator for (seed, *key): draws on the CPU do not depend on the device."""
    generator = torch.Generator()
    generator.manual_seed(step_seed(seed, *key))
    return generator


def epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    """The order in which epoch `epoch` visits `size` examples (a seeded permutation)."""
    return torch.randperm(size, generator=step_generator(seed, STREAM_ORDER, epoch)).tolist()


def stream_batch(seed: int, step: int, batch_size: int, size: int) -> list[int]:
    """Indices of the batch of step `step` (0-based) in the stream of shuffled epochs.

    Epochs (seeded permutations of the `size` examples) are laid end to end and cut into
    batches of `batch_size`: every batch is full, every example is seen equally often,
    and a batch may straddle two epochs.
    """
    first = step * batch_size
    indices: list[int] = []
    epoch, offset = divmod(first, size)
    while len(indices) < batch_size:
        order = epoch_order(seed, epoch, size)
        take = order[offset : offset + batch_size - len(indices)]
        indices.extend(take)
        epoch, offset = epoch + 1, 0
    return indices


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA) as weights_only-safe types."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- accelerate -----------------------------------------------------------------------


def launcher_world_size() -> int:
    """How many processes the launcher started (`WORLD_SIZE`, which `torchrun`, `accelerate
    launch` and `torch.distributed.run` set for every process); 1 without a launcher."""
    value = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        size = int(value)
    except ValueError:
        raise AdaptError(f"WORLD_SIZE={value!r} in the environment is not a number") from None
    if size < 1:
        raise AdaptError(f"WORLD_SIZE={value!r} in the environment must be >= 1")
    return size


def make_accelerator(mixed_precision: str, device: str | torch.device) -> Any:
    """An `accelerate.Accelerator` for this process, placing nothing itself.

    One process (no launcher): on `device`. accelerate keeps one process-wide state and
    refuses a second Accelerator with another precision; a single process may train
    several times with different settings (`adapt run` personalizes, then fine-tunes),
    so that state is reset here.

    Under a launcher (`WORLD_SIZE` > 1): the distributed Accelerator, one process per
    device; `device` gives only the kind: "cpu" is gloo on the CPU, "cuda" is nccl with
    each process on its own GPU (`cuda:LOCAL_RANK`, `accelerator.device`); an index
    ("cuda:1") is refused, it would put every process on one GPU. The process group is
    kept between trainings of one process (only the precision state is reset).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    if mixed_precision not in MIXED_PRECISION:
        raise AdaptError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {mixed_precision!r}"
        )
    device = torch.device(device)
    world = launcher_world_size()
    if world > 1 and device.index is not None:
        raise AdaptError(
            f"device {device} under a launcher of {world} processes: each process uses its "
            f"own device (cuda:LOCAL_RANK); give --device {device.type}"
        )
    if world == 1 and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    partial = PartialState._shared_state
    if partial and partial.get("distributed_type", DistributedType.NO) == DistributedType.NO:
        AcceleratorState._reset_state(reset_partial_state=True)
    elif partial:  # distributed: keep the process group, allow another precision
        AcceleratorState._reset_state(reset_partial_state=False)
    try:
        accelerator = Accelerator(
            cpu=device.type == "cpu", mixed_precision=mixed_precision, device_placement=False
        )
    except (ValueError, RuntimeError) as error:  # e.g. fp16 without a GPU
        raise AdaptError(f"mixed_precision={mixed_precision!r} on {device}: {error}") from error
    if world > 1 and accelerator.num_processes != world:
        raise AdaptError(
            f"WORLD_SIZE={world} but accelerate set up {accelerator.num_processes} process(es) "
            f"on {device.type}: start the processes with accelerate launch or torchrun"
        )
    return accelerator


def training_device(accelerator: Any, device: str | torch.device) -> torch.device:
    """Where this process trains: `device` in one process, the process's own under a
    launcher (`make_accelerator`)."""
    return accelerator.device if accelerator.num_processes > 1 else torch.device(device)


def check_batch_for_processes(name: str, batch_size: int, accelerator: Any) -> None:
    """Refuse a global batch the processes cannot share equally: each takes
    batch_size / processes images of it (`process_share`)."""
    processes = accelerator.num_processes
    if batch_size % processes:
        # Every process finds this; the barrier lets each one report it before any exits
        # (a launcher stops the others once one has ended).
        accelerator.wait_for_everyone()
        raise AdaptError(
            f"{name} {batch_size} is the global batch, shared by {processes} processes: it "
            f"must be a multiple of {processes} (each process takes an equal part). Nothing "
            "was written"
        )


def process_share(batch_size: int, accelerator: Any) -> slice:
    """This process's part of a global micro-batch of `batch_size` images: the
    contiguous block batch_size / processes long at its rank.

    Every process draws the whole step as one process would (the same `stream_batch`
    indices and `step_generator` draws, from the same (seed, stream, step)) and keeps
    its block, so the processes' blocks put together are exactly the one-process batch;
    equal blocks make the mean of their mean losses the mean over the global batch, and
    DDP's gradient (the mean over processes) the one-process gradient.
    """
    per_process = batch_size // accelerator.num_processes
    start = accelerator.process_index * per_process
    return slice(start, start + per_process)


def open_run(folder: RunFolder, accelerator: Any) -> RunStart:
    """`folder.open()` by the main process only; the others get its answer.

    Every process has checked the folder (read only) before the settings are gathered
    (which waits for all), so none reads while the main process writes or deletes. The
    processes' settings must be equal (else every process raises `AdaptError`). The main
    process's RunStart, or its refusal, is broadcast: a refusal raises the same
    `AdaptError` in every process.
    """
    if accelerator.num_processes == 1:
        return folder.open()
    from accelerate.utils import broadcast_object_list, gather_object

    # All processes must run the same training (a node started with other options, or
    # another reference set, would train something else): compare before any write.
    settings = gather_object([folder.settings])
    for rank, other in enumerate(settings):
        if other != settings[0]:
            changed = sorted(key for key in set(other) | set(settings[0])
                             if other.get(key) != settings[0].get(key))
            raise AdaptError(
                f"process {rank} was started with other settings than process 0 "
                f"({', '.join(changed)} differ): start every process with the same command "
                "and inputs. Nothing was written"
            )
    answer: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            start = folder.open()
            answer = [("start", start.step, None if start.checkpoint is None
                       else str(start.checkpoint), start.complete)]
        except AdaptError as error:
            answer = [("error", str(error))]
    answer = broadcast_object_list(answer, from_process=0)
    kind, *rest = answer[0]
    if kind == "error":
        raise AdaptError(rest[0])
    step, checkpoint, complete = rest
    return RunStart(step=step, checkpoint=None if checkpoint is None else Path(checkpoint),
                    complete=complete)


# -- output folder ----------------------------------------------------------------------


@dataclass(frozen=True)
class RunStart:
    """How `RunFolder.open` found the folder: a fresh run, a resume at `step`, or complete."""

    step: int = 0
    checkpoint: Path | None = None
    complete: bool = False


def canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON, so that a rerun compares like with like."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=str))


def prepare_run(
    config: Any,
    *,
    kind: str,
    config_name: str,
    weights_name: str,
    inputs: Mapping[str, Any] | None = None,
) -> tuple[Any, RunFolder]:
    """Validate `config` and read its reference set (bad input fails before any change);
    return the set and the run's output folder (not opened yet: see `RunFolder`).

    `inputs`: the run's other input paths by option name (None values are skipped); like
    the references, none may be the output folder or a run file inside it.
    """
    from adapt.references import load_reference_set, reference_fingerprint

    config.validate()
    check_inputs_apart(config.out, {"references": config.references, **(inputs or {})})
    references = load_reference_set(config.references)
    settings = result_settings(config)
    # The content, not only the path: a class added to the folder is another run.
    settings["references_content"] = reference_fingerprint(references)
    folder = RunFolder(
        config.out,
        kind=kind,
        config_name=config_name,
        weights_name=weights_name,
        settings=settings,
        overwrite=config.overwrite,
        keep_checkpoints=config.keep_checkpoints,
    )
    return references, folder


def check_inputs_apart(out: str | os.PathLike, inputs: Mapping[str, Any]) -> None:
    """Refuse an input path that is the output folder or a run file (`RUN_FILES`) in it:
    the run writes there, and `overwrite` deletes those files before reading them."""
    out_path = Path(out).expanduser().resolve()
    for name, value in inputs.items():
        if value is None or not str(value).strip():
            continue
        path = Path(str(value)).expanduser().resolve()
        inside = path.is_relative_to(out_path) and path != out_path
        if path == out_path or (inside and path.relative_to(out_path).parts[0] in RUN_FILES):
            flag = "--" + name.replace("_", "-")
            what = "is the output folder" if path == out_path else "lies in the output folder"
            raise AdaptError(
                f"{name} ({flag}) {value} {what} --out {out}: the run writes its results "
                "there (and --overwrite deletes them first), so it cannot also read them. "
                "Nothing was changed; write the output to another folder"
            )


class RunFolder:
    """The output folder of one training run (see the module docstring).

    `settings` are everything that decides the result; they are compared with the
    folder's `config_name` file to decide between resuming and refusing. `weights_name`
    is the file whose presence (with status "complete") marks a finished run.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        kind: str,
        config_name: str,
        weights_name: str,
        settings: Mapping[str, Any],
        overwrite: bool = False,
        keep_checkpoints: int | None = None,
    ):
        self.out = Path(out).expanduser()
        self.kind = kind
        self.config_path = self.out / config_name
        self.weights_path = self.out / weights_name
        self.settings = canonical(settings)
        self.overwrite = overwrite
        self.checkpoints = CheckpointStore(self.out / CHECKPOINTS, keep=keep_checkpoints)
        self.loss_log_path = self.out / LOSS_LOG
        self.loss_curve_path = self.out / LOSS_CURVE
        self.record: dict[str, Any] = {}

    def present(self) -> list[str]:
        return [name for name in RUN_FILES if (self.out / name).exists()]

    def check(self) -> None:
        """Raise `AdaptError` if `open` would refuse the folder; change nothing."""
        if self.out.exists() and not self.out.is_dir():
            raise AdaptError(f"output {self.out} exists and is not a folder")
        present = self.present() if self.out.is_dir() else []
        if present and not self.overwrite:
            previous = self._read_record() if self.config_path.is_file() else None
            self._check_same_run(present, previous)

    def open(self) -> RunStart:
        """Refuse, resume or start; nothing is changed when refusing."""
        self.check()
        present = self.present() if self.out.is_dir() else []
        previous = self._read_record() if self.config_path.is_file() else None
        if present and not self.overwrite:
            assert previous is not None
            if previous.get("status") == "complete" and self.weights_path.is_file():
                self.record = previous
                return RunStart(complete=True)
            latest = self.checkpoints.latest()
            step, path = latest if latest else (0, None)
            self.record = previous
            self.record.setdefault("resumed", []).append({"at": now(), "step": step})
            self.record.update(status="running", finished=None)
            self.write_record()
            return RunStart(step=step, checkpoint=path)
        if present:  # overwrite: remove the run files, and only those
            for name in present:
                target = self.out / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise AdaptError(f"cannot create output folder {self.out}: {error}") from error
        if not os.access(self.out, os.W_OK):
            raise AdaptError(f"output folder {self.out} is not writable")
        self.record = {
            "kind": self.kind,
            "status": "running",
            "settings": self.settings,
            "started": now(),
            "finished": None,
            "resumed": [],
            "versions": package_versions(),
        }
        self.write_record()
        return RunStart()

    def _read_record(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def _check_same_run(self, present: list[str], previous: dict[str, Any] | None) -> None:
        where = f"output folder {self.out}"
        advice = "nothing was changed; choose another output folder or pass overwrite (--overwrite)"
        if previous is None:
            what = ", ".join(present)
            state = "unreadable" if self.config_path.exists() else "no"
            raise AdaptError(
                f"{where} holds files of another run ({what}) with {state} "
                f"{self.config_path.name}; {advice}"
            )
        if previous.get("kind") != self.kind:
            raise AdaptError(
                f"{where} holds a {previous.get('kind')!r} run, not {self.kind!r}; {advice}"
            )
        old = previous.get("settings", {})
        if old != self.settings:
            keys = sorted(set(old) | set(self.settings))
            changed = [
                f"{key}: {old.get(key, '<unset>')!r} -> {self.settings.get(key, '<unset>')!r}"
                for key in keys
                if old.get(key) != self.settings.get(key)
            ]
            raise AdaptError(
                f"{where} holds a {self.kind} run with other settings ({'; '.join(changed)}); "
                f"{advice}"
            )

    def write_record(self, **updates: Any) -> None:
        """Update the folder's settings file (atomically)."""
        self.record.update(updates)
        write_json(self.config_path, self.record)

    def finish(self, **updates: Any) -> None:
        self.write_record(status="complete", finished=now(), **updates)


def current_umask() -> int:
    """The process's file-mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file (0666) or folder (0777) the mode the umask would have given it.

    `tempfile.mkstemp`/`mkdtemp` create private (0600/0700) entries, which renaming
    into place would otherwise keep.
    """
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (`atomic_write`); class names stay readable (UTF-8)."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    atomic_write(path, text.encode("utf-8"))


# -- checkpoints ----------------------------------------------------------------------


class CheckpointStore:
    """`folder/step_N/` = `weights.safetensors` (trained tensors) + `state.pt` (the rest).

    `keep`: how many of the newest checkpoints to keep (None: all).
    """

    WEIGHTS = "weights.safetensors"
    STATE = "state.pt"

    def __init__(self, folder: Path, keep: int | None = None):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        self.folder = Path(folder)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step}"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for entry in self.folder.iterdir():
            name = entry.name
            if name.startswith("step_") and name[5:].isdigit() and entry.is_dir():
                if (entry / self.WEIGHTS).is_file() and (entry / self.STATE).is_file():
                    found.append(int(name[5:]))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        steps = self.steps()
        return (steps[-1], self.path(steps[-1])) if steps else None

    def save(
        self, step: int, weights: Mapping[str, torch.Tensor], state: Mapping[str, Any]
    ) -> Path:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(step)
        tmp = Path(tempfile.mkdtemp(dir=self.folder, prefix=f".step_{step}."))
        honour_umask(tmp)
        try:
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
            save_file(tensors, str(tmp / self.WEIGHTS), metadata={"step": str(step)})
            torch.save(dict(state, step=step), tmp / self.STATE)
            for written in (tmp / self.WEIGHTS, tmp / self.STATE):
                honour_umask(written)  # safetensors writes files private (0600)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        if self.keep is not None:
            for old in self.steps()[: -self.keep]:
                shutil.rmtree(self.path(old), ignore_errors=True)
        return target

    def load(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors.torch import load_file

        weights = load_file(str(Path(path) / self.WEIGHTS), device="cpu")
        state = torch.load(Path(path) / self.STATE, map_location="cpu", weights_only=True)
        return weights, state


def load_into(
    parameters: Mapping[str, torch.nn.Parameter | torch.Tensor],
    saved: Mapping[str, torch.Tensor],
) -> None:
    """Copy saved tensors into named parameters/buffers; the names must match exactly."""
    missing = sorted(set(parameters) - set(saved))
    unexpected = sorted(set(saved) - set(parameters))
    if missing or unexpected:
        raise AdaptError(
            f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, tensor in parameters.items():
            tensor.copy_(saved[name])


# -- logs, plots, progress --------------------------------------------------------------


class LossLog:
    """A TSV with one row per step: a header line, then values; appended row by row."""

    def __init__(self, path: Path, columns: Sequence[str]):
        if "step" not in columns:
            raise ValueError("a loss log needs a 'step' column")
        self.path = Path(path)
        self.columns = list(columns)

    def start(self, resume_step: int) -> None:
        """Start a new log (step 0) or keep the rows up to `resume_step` of an existing one."""
        rows = [r for r in self.read() if int(r["step"]) <= resume_step] if resume_step else []
        lines = ["\t".join(self.columns)]
        lines += ["\t".join(str(row.get(c, "")) for c in self.columns) for row in rows]
        handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
        os.replace(tmp, self.path)

    def append(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write("\t".join(_format(row.get(c, "")) for c in self.columns) + "\n")
            file.flush()

    def read(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8")
        complete = text[: text.rfind("\n") + 1]  # ignore a half-written last line
        lines = complete.splitlines()
        if not lines:
            return []
        header = lines[0].split("\t")
        return [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:] if line]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.8g}"
    return str(value)


def plot_loss_curve(
    log: LossLog, path: Path, columns: Iterable[str], *, title: str = ""
) -> Path | None:
    """One panel per loss column against the step; columns without values are skipped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = log.read()
    series = {}
    for column in columns:
        points = [
            (int(r["step"]), float(r[column]))
            for r in rows
            if r.get(column) not in (None, "") and math.isfinite(float(r[column]))
        ]
        if points:
            series[column] = points
    if not series:
        return None
    figure = Figure(figsize=(6, 2.2 * len(series)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (column, points) in zip(axes, series.items(), strict=True):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, linewidth=1)
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.png")
    os.close(handle)
    try:
        figure.savefig(tmp, dpi=100)
        honour_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled)


# -- the training loop ------------------------------------------------------------------


def bitsandbytes_module() -> Any:
    """bitsandbytes (8-bit AdamW), or one clear `AdaptError` when it is not installed."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise AdaptError(
            "use_8bit_adam needs the bitsandbytes package (pip install bitsandbytes, CUDA "
            "only), which is not installed; run without --use-8bit-adam"
        ) from error
    return bitsandbytes


def make_optimizer(
    parameters: list[torch.nn.Parameter], *, lr: float, weight_decay: float, use_8bit: bool = False
) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999, eps 1e-8), bitsandbytes' 8-bit one if `use_8bit`."""
    adamw = bitsandbytes_module().optim.AdamW8bit if use_8bit else torch.optim.AdamW
    return adamw(parameters, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)


class RunInside(torch.nn.Module):
    """A module whose forward calls the function it is given: DDP wraps it so that a
    training step's own code (which calls the trained module's parts directly: IF-II's
    UNet through `denoise_at_timesteps`, CLIP's text tower through `encode_text` in
    chunks) runs inside DDP's forward, where DDP prepares the gradient reduction."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, function: Callable[..., Any], *args: Any) -> Any:
        return function(*args)


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` under torch's DistributedDataParallel, on the process group accelerate set up.

    Built here rather than by `accelerator.prepare(model)`, which would also run the
    forward under autocast: mixed precision stays where the one-process code puts it.
    Batch norm is synchronized across processes (SyncBatchNorm, GPUs only), so its
    statistics are those of the global batch; on CPUs `check_no_batch_norm` refuses it.
    Buffers are not broadcast at each forward: they are equal in every process (the same
    weights, loaded the same way, and SyncBatchNorm updates them alike).
    """
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cpu":
        check_no_batch_norm(module)
    else:
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return DistributedDataParallel(
        RunInside(module), device_ids=None if device.type == "cpu" else [device.index],
        forward_sync_buffers=False,
    )


def check_no_batch_norm(module: torch.nn.Module) -> None:
    """Refuse batch norm layers in a module trained by several CPU processes."""
    found = [name for name, layer in module.named_modules()
             if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)]
    if found:
        raise AdaptError(
            f"{len(found)} batch norm layer(s) ({found[0]}, ...) would normalize each "
            "process's share of the batch on its own, which is not the one-process result; "
            "torch synchronizes batch norm on GPUs only: train this classifier in one CPU "
            "process or on GPUs"
        )


class Optimization:
    """The update of a training step and its resumable state.

    `backward(loss)`: accelerate's backward (loss scaling for fp16), gradients summed
    over calls; `update()`: gradient clipping at `max_grad_norm` (None: off), the
    optimizer and learning-rate schedule steps, gradients reset.
    `state_dict()` / `load_state_dict(state)`: optimizer, schedule, loss scaler and the
    global RNG states, as a checkpoint's `state.pt` holds them.

    Several processes (a launcher): `module`, the module holding the trained parameters,
    is wrapped in torch's DistributedDataParallel, and every micro-batch runs through
    `run` inside DDP's forward, so DDP averages the gradients over the processes in the
    backward of the step's last micro-batch (the others under `no_sync`: their
    gradients add up locally first, as in one process).
    """

    def __init__(
        self,
        accelerator: Any,
        optimizer: torch.optim.Optimizer,
        *,
        lr_scheduler: str,
        steps: int,
        parameters: list[torch.nn.Parameter],
        max_grad_norm: float | None,
        module: torch.nn.Module | None = None,
    ):
        self.accelerator = accelerator
        self.lr_scheduler = make_lr_scheduler(optimizer, lr_scheduler, steps)
        self.optimizer = accelerator.prepare(optimizer)  # loss scaling for fp16
        self.parameters = parameters
        self.max_grad_norm = max_grad_norm
        self.parallel = None
        if accelerator.num_processes > 1:
            if module is None:
                raise ValueError("several processes need the trained module (module=...)")
            self.parallel = data_parallel(module, accelerator.device)

    def run(self, compute: StepLoss, step: int, micro: int, last: bool) -> Any:
        """`compute(step, micro)`; under DDP inside its forward, gradients synchronized in
        the backward of the `last` micro-batch of the step only."""
        if self.parallel is None:
            return compute(step, micro)
        if last:
            return self.parallel(compute, step, micro)
        with self.parallel.no_sync():
            return self.parallel(compute, step, micro)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Add the gradient of `loss` to the parameters' gradients (under DDP, `last` must be
        the `last` of the `run` that computed `loss`)."""
        if self.parallel is not None and not last:
            with self.parallel.no_sync():
                self.accelerator.backward(loss)
            return
        self.accelerator.backward(loss)

    def update(self) -> float:
        """Clip, step and reset the gradients; return the learning rate of this update."""
        if self.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def state_dict(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])


def build_classifier_on(
    name: str,
    class_names: list[str],
    options: Mapping[str, Any],
    device: torch.device,
    **extra: Any,
) -> torch.nn.Module:
    """The registered classifier `name` for these classes, built with `options` and `extra`
    (and `device`, when its builder takes one), on `device`."""
    import classifiers  # noqa: F401  (registers the builders)
    from classifiers import registry

    options = dict(options)
    if registry.CLASSIFIERS.accepts(name, "device"):
        options.setdefault("device", str(device))
    options.update(extra)
    return registry.build_classifier(name, class_names=class_names, **options).to(device)


def load_batch(
    references: Any, seed: int, index: int, batch_size: int, part: slice | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, H, W] in [0, 1] and labels [B] of batch `index` (0-based) in the
    stream of shuffled epochs (`stream_batch`); with gradient accumulation G, step s
    reads batches s G .. s G + G - 1. `part`: only those positions of the batch (a
    process's share, `process_share`)."""
    indices = stream_batch(seed, index, batch_size, len(references))
    items = [references[i] for i in (indices if part is None else indices[part])]
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.long)
    return images, labels


def micro_slice(micro: int, batch_size: int) -> slice:
    """The images of micro-batch `micro` among the draws made for a whole step."""
    return slice(micro * batch_size, (micro + 1) * batch_size)


def check_finite_loss(
    loss: torch.Tensor, step: int, terms: Mapping[str, torch.Tensor | None] | None = None
) -> None:
    """Raise `FloatingPointError` for a non-finite loss at (0-based) `step`, naming the
    values of its `terms` (None: a term not computed)."""
    if not torch.isfinite(loss):
        named = ", ".join(
            f"{name}={None if value is None else float(value)}"
            for name, value in (terms or {}).items()
        )
        raise FloatingPointError(
            f"non-finite loss at step {step + 1}{f' ({named})' if named else ''}; lower the "
            "learning rate or use mixed_precision='bf16' instead of fp16"
        )


# What one micro-batch of a step computes, called as compute(step, micro): its loss
# (checked finite), the loss log's values (but step, lr and seconds) and the progress
# bar's postfix. The update of step s follows its `grad_accum` micro-batches.
StepLoss = Callable[[int, int], tuple[torch.Tensor, dict[str, float], dict[str, str]]]


class DeferredSignals:
    """Hold SIGINT and SIGTERM while a step runs, so the loop can checkpoint first.

    `received`: the signal number that arrived (None: none). `deliver()` restores the
    previous handlers and raises that signal again, so it acts as it would have (SIGINT:
    KeyboardInterrupt; SIGTERM: the default ends the process). A second signal while one
    is held acts at once. Handlers can only be set from the main thread; elsewhere this
    does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> DeferredSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._hold)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()

    def _hold(self, number: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: stop now
            self._restore()
            signal.raise_signal(number)
            return
        self.received = number

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            # None: a handler set outside Python, which cannot be put back; use the default.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def deliver(self) -> None:
        if self.received is not None:
            number, self.received = self.received, None
            self._restore()
            signal.raise_signal(number)


def train_steps(
    folder: RunFolder,
    start: RunStart,
    compute: StepLoss,
    optimization: Optimization,
    *,
    weights: Mapping[str, torch.Tensor],
    steps: int,
    log_columns: Sequence[str],
    plot_columns: Sequence[str],
    checkpoint_every: int,
    desc: str,
    progress: bool,
    grad_accum: int = 1,
    epoch_steps: int | None = None,
) -> LossLog:
    """Resume from `start` (the trained `weights` and the optimization state of its
    checkpoint), then run steps `start.step` .. `steps - 1` (0-based): `compute(step,
    micro)` and its backward for each of the `grad_accum` micro-batches (losses divided by
    `grad_accum`), the update, a row of the loss log (values averaged over the
    micro-batches), the progress bar; a checkpoint and the loss curve every
    `checkpoint_every` steps (0: never), after every `epoch_steps` steps (None: no
    epochs), and when SIGINT/SIGTERM arrives (then the signal is delivered). Return the
    loss log.

    Several processes: every process resumes from the same checkpoint (the main process
    writes or prunes one only after the first step's gradient reduction, which waits for
    all); only the main process writes the log, the checkpoints and the curve; the
    logged values are means over the processes (equal shares: the global batch's); a
    signal reaching any process stops all of them after the same step, once the main
    process has written its checkpoint."""
    accelerator = optimization.accelerator
    main = accelerator.is_main_process
    if start.checkpoint is not None:
        saved, state = folder.checkpoints.load(start.checkpoint)
        load_into(weights, saved)
        optimization.load_state_dict(state)
    log = LossLog(folder.loss_log_path, log_columns)
    if main:
        log.start(start.step)
    bar = progress_bar(steps, start.step, desc, progress and main)
    try:
        with DeferredSignals() as signals:
            for step in range(start.step, steps):
                began = time.perf_counter()
                totals: dict[str, float] = {}
                for micro in range(grad_accum):
                    last = micro == grad_accum - 1
                    loss, values, postfix = optimization.run(compute, step, micro, last)
                    optimization.backward(loss / grad_accum if grad_accum > 1 else loss, last)
                    for name, value in values.items():
                        totals[name] = totals.get(name, 0.0) + float(value) / grad_accum
                lr = optimization.update()
                done = step + 1
                row = values if grad_accum == 1 else totals
                row = mean_over_processes(row, accelerator)
                if main:
                    log.append({**row, "step": done, "lr": lr,
                                "seconds": time.perf_counter() - began})
                bar.update(1)
                bar.set_postfix(postfix)
                periodic = bool(checkpoint_every) and done % checkpoint_every == 0
                epoch_end = bool(epoch_steps) and done % epoch_steps == 0
                interrupted = agree_on_signal(signals, accelerator)
                if main and (interrupted or ((periodic or epoch_end) and done < steps)):
                    folder.checkpoints.save(done, weights, optimization.state_dict())
                    plot_loss_curve(log, folder.loss_curve_path, plot_columns)
                if interrupted:
                    accelerator.wait_for_everyone()  # none ends before the checkpoint exists
                    bar.close()
                    signals.deliver()
    finally:
        bar.close()
    return log


def mean_over_processes(values: Mapping[str, float], accelerator: Any) -> dict[str, float]:
    """The means over the processes of each process's logged values (one all-reduce)."""
    if accelerator.num_processes == 1:
        return dict(values)
    import torch.distributed as dist

    names = list(values)
    device = accelerator.device  # gloo: the CPU; nccl: the process's GPU
    tensor = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= accelerator.num_processes
    return dict(zip(names, tensor.tolist(), strict=True))


def agree_on_signal(signals: DeferredSignals, accelerator: Any) -> bool:
    """Whether a held SIGINT/SIGTERM reached this process or (several processes) any other,
    which then acts in every process: a scheduler may signal one process only, and the
    others would otherwise wait in the next step's reduction for ever."""
    if accelerator.num_processes == 1:
        return signals.received is not None
    import torch.distributed as dist

    device = accelerator.device  # gloo: the CPU; nccl: the process's GPU
    number = torch.tensor([signals.received or 0], dtype=torch.int64, device=device)
    dist.all_reduce(number, op=dist.ReduceOp.MAX)
    if signals.received is None and int(number) != 0:
        signals.received = int(number)
    return signals.received is not None


def finish_run(
    folder: RunFolder, log: LossLog, plot_columns: Sequence[str], *, title: str,
    certify: Mapping[str, Any],
) -> None:
    """After the weights are saved: the loss curve, the record marked complete with the
    final losses and the `certify` options that use the result, the checkpoints deleted.
    (Main process only, when there are several.)"""
    plot_loss_curve(log, folder.loss_curve_path, plot_columns, title=title)
    folder.finish(final=final_losses(log), certify=dict(certify))
    # The weights file is the result: the resumable state is no longer needed.
    shutil.rmtree(folder.checkpoints.folder, ignore_errors=True)


def final_losses(log: LossLog, window: int = 10) -> dict[str, Any]:
    """The last step's losses, and their means over the last `window` steps."""
    rows = log.read()
    if not rows:
        return {}
    columns = [c for c in log.columns if c not in ("step", "lr", "seconds")]
    final: dict[str, Any] = {"step": int(rows[-1]["step"])}
    for column in columns:
        values = [float(r[column]) for r in rows[-window:] if r.get(column) not in (None, "")]
        values = [v for v in values if math.isfinite(v)]
        final[column] = float(rows[-1][column]) if rows[-1].get(column) else None
        if final[column] is not None and not math.isfinite(final[column]):
            final[column] = None
        final[f"{column}_mean_last_{window}"] = sum(values) / len(values) if values else None
    return final
