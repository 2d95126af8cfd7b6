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
- `CheckpointStore`: `checkpoints/step_N/` holds the trained tensors as safetensors and
  the rest of the training state (optimizer, learning-rate schedule, RNG states, step)
  as a torch file read back with `weights_only=True`. Written to a temporary folder and
  renamed, so an interruption while saving leaves the previous checkpoint usable.
- `LossLog`: `loss_log.tsv`, one row per step, appended and flushed row by row; on
  resume, rows after the checkpoint's step are dropped (they are recomputed).
- `plot_loss_curve`: the log as a PNG (matplotlib's object API with the Agg canvas: no
  pyplot, no global backend switch).
- `progress_bar`: tqdm with the loss terms as postfix.
- `make_accelerator`: an `accelerate.Accelerator` for one device and mixed precision.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
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
MIXED_PRECISION = ("no", "fp16", "bf16")

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


def make_accelerator(mixed_precision: str, device: str | torch.device) -> Any:
    """An `accelerate.Accelerator` for one process on `device`, placing nothing itself.

    accelerate keeps one process-wide state and refuses a second Accelerator with another
    precision; a single (non-distributed) process may train several times with different
    settings (`adapt run` personalizes, then fine-tunes), so that state is reset here.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    if mixed_precision not in MIXED_PRECISION:
        raise AdaptError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {mixed_precision!r}"
        )
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    partial = PartialState._shared_state
    if partial and partial.get("distributed_type", DistributedType.NO) == DistributedType.NO:
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return Accelerator(
            cpu=device.type == "cpu", mixed_precision=mixed_precision, device_placement=False
        )
    except (ValueError, RuntimeError) as error:  # e.g. fp16 without a GPU
        raise AdaptError(f"mixed_precision={mixed_precision!r} on {device}: {error}") from error


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


def write_json(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2, sort_keys=False, default=str)
            file.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        try:
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
            save_file(tensors, str(tmp / self.WEIGHTS), metadata={"step": str(step)})
            torch.save(dict(state, step=step), tmp / self.STATE)
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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled)
