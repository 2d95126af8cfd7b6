"""`adapt` at the paper's scale, on tiny models of the real classes (tests/tiny_models.py,
tests/tiny_classifiers.py): what must hold when the sets, batches and runs get large.

- CLIP's text side in chunks: the chunked class embeddings and their gradient equal the
  unchunked ones (`compute_class_embeddings(grad=True)`, the classifier's own code), and
  the forward keeps a fraction of the activations.
- Gradient accumulation: G micro-batches of b give the gradient of one batch of G b, step
  by step (the optimizer's input is recorded and compared).
- The reference set's content is part of a run's settings: a class added or an image
  changed is refused, never returned as the old result.
- Checkpoints at every epoch's end and on SIGINT/SIGTERM (sent from inside a step); the
  newest N are kept; none after success; a run resumed from a signal's checkpoint equals
  an uninterrupted one.
- Files and folders get the modes the umask gives (not tempfile's 0600/0700).
- The prompt and token a LoRA folder records are used by finetune unless given.
- `variant`: checkpoints saved only as `*.fp16.safetensors` load with variant="fp16".
"""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import adapt.finetune as finetune_module
from adapt.errors import AdaptError
from adapt.finetune import CLASSIFIER_WEIGHTS, FinetuneConfig, chunked_class_embeddings, finetune
from adapt.personalize import LORA_WEIGHTS, PersonalizeConfig, personalize
from adapt.training import Optimization
from denoisers.lora_info import recorded_lora_prompt, resolve_lora_prompt
from denoisers.registry import UnreadableCheckpointError
from tests.tiny_classifiers import clip_options, save_tiny_clip, snapshot, write_reference_set
from tests.tiny_models import one_thread, save_tiny_if2, save_tiny_if2_lora, tiny_if2_pipeline

CLASSES = ["dog", "cat"]

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale_models")
    variant_if2 = folder / "if2_fp16_files"
    tiny_if2_pipeline().save_pretrained(variant_if2, safe_serialization=True, variant="fp16")
    return {
        "if2": save_tiny_if2(folder / "if2"),
        "if2_variant": variant_if2,
        "clip": save_tiny_clip(folder / "clip"),
        "references": write_reference_set(folder / "refs", CLASSES, shots=2, size=32),
    }


@pytest.fixture
def finetune_config(tiny, tmp_path):
    def make(**changes) -> FinetuneConfig:
        settings = dict(
            references=str(tiny["references"]), out=str(tmp_path / "clf"),
            classifier="clip-b32",
            classifier_options=clip_options(tiny["clip"], tmp_path / "text_cache"),
            denoiser_checkpoint=str(tiny["if2"]), epochs=1, lr=1e-3, batch_size=2,
            checkpoint_every=0, resolution=32,
        )
        settings.update(changes)
        return FinetuneConfig(**settings)

    return make


@pytest.fixture
def personalize_config(tiny, tmp_path):
    def make(**changes) -> PersonalizeConfig:
        settings = dict(
            references=str(tiny["references"]), out=str(tmp_path / "lora"),
            checkpoint=str(tiny["if2"]), classifier="clip-b32",
            classifier_options=clip_options(tiny["clip"], tmp_path / "text_cache"),
            lam=0.5, steps=2, lr=1e-3, batch_size=2, checkpoint_every=0, resolution=32,
        )
        settings.update(changes)
        return PersonalizeConfig(**settings)

    return make


def interrupt_at(monkeypatch, call: int, action=None) -> None:
    """Run `action` (default: raise KeyboardInterrupt) in the classifier call `call` of
    finetune (one call per micro-batch)."""
    calls = {"n": 0}
    original = finetune_module.classifier_logits

    def spy(*args):
        calls["n"] += 1
        if calls["n"] == call:
            if action is None:
                raise KeyboardInterrupt
            action()
        return original(*args)

    monkeypatch.setattr(finetune_module, "classifier_logits", spy)


def checkpoint_names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


# -- CLIP's text side in chunks ----------------------------------------------------------


def test_chunked_text_embeddings_have_the_unchunked_gradient(tiny, tmp_path):
    import classifiers

    names = ["dog", "cat", "bird"]
    clip = classifiers.build_classifier(
        "clip-b32", class_names=names, **clip_options(tiny["clip"], tmp_path / "cache")
    )
    clip.model.requires_grad_(True)
    assert len(clip.templates) == 2
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    labels = torch.tensor([0, 1, 2, 0])

    def gradient(embed):
        clip.model.zero_grad(set_to_none=True)
        embeddings = embed()
        F.cross_entropy(clip(images, class_embeddings=embeddings), labels).backward()
        grads = {n: p.grad.clone() for n, p in clip.model.named_parameters()
                 if p.grad is not None}
        return embeddings.detach(), grads

    plain, plain_grads = gradient(lambda: clip.compute_class_embeddings(grad=True))
    # 2 prompts a chunk = one class (2 templates) a chunk: three chunks
    chunked, chunked_grads = gradient(lambda: chunked_class_embeddings(clip, 2))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    assert set(chunked_grads) == set(plain_grads)
    assert any(n.startswith("transformer.") for n in plain_grads)  # the text tower learns
    assert any(n.startswith("visual.") for n in plain_grads)
    for name, grad in plain_grads.items():
        # float32 rounding, relative to the tensor's scale (elements near 0 included)
        scale = float(grad.abs().max())
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-5 * scale,
                                   msg=name)

    def saved_bytes(embed):
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            embed()
        return total[0]

    # What the forward keeps for the backward: all prompts' activations unchunked,
    # next to nothing chunked (each chunk's are recomputed in the backward).
    kept_plain = saved_bytes(lambda: clip.compute_class_embeddings(grad=True))
    kept_chunked = saved_bytes(lambda: chunked_class_embeddings(clip, 2))
    assert kept_chunked * 10 < kept_plain


# -- gradient accumulation ------------------------------------------------------------------


@pytest.fixture
def recorded_gradients(monkeypatch):
    """The gradients each optimizer update receives, in order."""
    seen = []
    original = Optimization.update

    def update(self):
        seen.append([p.grad.detach().clone() for p in self.parameters])
        return original(self)

    monkeypatch.setattr(Optimization, "update", update)
    return seen


def assert_same_gradients(a, b):
    assert len(a) == len(b) and a
    for step_a, step_b in zip(a, b, strict=True):
        assert any(g.abs().sum() > 0 for g in step_a)
        for grad_a, grad_b in zip(step_a, step_b, strict=True):
            # float32 rounding of sums taken in another order through the UNet/CLIP
            # (seen: up to 3e-5 of the norm); another batch or other draws differ by O(1)
            assert (grad_b - grad_a).norm() <= 1e-4 * grad_a.norm()


def test_personalize_grad_accum_equals_one_big_batch(personalize_config, tmp_path,
                                                      recorded_gradients):
    # lr so small that step 2's gradient is taken at (nearly) the same weights in both runs
    common = dict(steps=2, lr=1e-12)
    personalize(personalize_config(out=str(tmp_path / "big"), batch_size=4, **common),
                progress=False)
    big = list(recorded_gradients)
    recorded_gradients.clear()
    out = personalize(personalize_config(out=str(tmp_path / "accum"), batch_size=2,
                                         grad_accum=2, **common), progress=False)
    assert_same_gradients(big, recorded_gradients)
    rows = [r.split("\t") for r in (tmp_path / "big" / "loss_log.tsv").read_text().splitlines()]
    accum = [r.split("\t") for r in (out / "loss_log.tsv").read_text().splitlines()]
    for row_big, row_accum in zip(rows[1:], accum[1:], strict=True):  # loss, L_diff, L_clf
        for a, b in zip(row_big[1:4], row_accum[1:4], strict=True):
            assert float(b) == pytest.approx(float(a), rel=1e-5)
    record = json.loads((out / "adapt_config.json").read_text())
    assert record["effective_batch_size"] == 4 and record["settings"]["grad_accum"] == 2


def test_finetune_grad_accum_equals_one_big_batch(finetune_config, tmp_path, recorded_gradients):
    common = dict(epochs=2, lr=1e-12)
    finetune(finetune_config(out=str(tmp_path / "big"), batch_size=4, **common), progress=False)
    big = list(recorded_gradients)
    recorded_gradients.clear()
    out = finetune(finetune_config(out=str(tmp_path / "accum"), batch_size=2, grad_accum=2,
                                   **common), progress=False)
    assert len(big) == 2  # one update per epoch of 4 references either way
    assert_same_gradients(big, recorded_gradients)
    assert json.loads((out / "finetune_config.json").read_text())["steps"] == 2


# -- the reference set's content ------------------------------------------------------------


def test_a_class_added_to_the_references_is_refused_not_the_old_lora_returned(
    personalize_config, tmp_path
):
    refs = write_reference_set(tmp_path / "refs3", CLASSES, shots=1, size=32)
    config = personalize_config(references=str(refs), steps=1)
    out = personalize(config, progress=False)
    before = snapshot(out)
    assert personalize(config, progress=False) == out  # unchanged set: complete, returned

    write_reference_set(refs, [*CLASSES, "bird"], shots=1, size=32)  # the same 2 + 1 more
    with pytest.raises(AdaptError, match=r"references_content: '2 classes, 2 images, "
                                         r"sha256:\w+' -> '3 classes, 3 images") as caught:
        personalize(config, progress=False)
    assert "--overwrite" in str(caught.value)
    assert snapshot(out) == before


def test_a_changed_reference_image_is_refused(finetune_config, tmp_path):
    from PIL import Image

    refs = write_reference_set(tmp_path / "refs", CLASSES, shots=1, size=32)
    config = finetune_config(references=str(refs), batch_size=2)
    out = finetune(config, progress=False)
    before = snapshot(out)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(refs / "images" / "0001" / "00.png")
    with pytest.raises(AdaptError, match=r"references_content: '2 classes, 2 images"):
        finetune(config, progress=False)
    assert snapshot(out) == before


# -- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize(("keep", "expected"), [(1, ["step_4"]), (2, ["step_2", "step_4"])])
def test_finetune_checkpoints_at_every_epoch_end_and_keeps_the_newest(
    finetune_config, tmp_path, monkeypatch, keep, expected
):
    # 4 references, batch 2: 2 steps an epoch; 3 epochs; no periodic checkpoints
    config = finetune_config(epochs=3, keep_checkpoints=keep, checkpoint_every=0)
    interrupt_at(monkeypatch, 6)  # during step 6, the last
    out = tmp_path / "clf"
    with pytest.raises(KeyboardInterrupt):
        finetune(config, progress=False)
    assert checkpoint_names(out) == expected
    monkeypatch.undo()
    finetune(config, progress=False)
    assert (out / CLASSIFIER_WEIGHTS).is_file()
    assert not (out / "checkpoints").exists()  # pruned after success
    record = json.loads((out / "finetune_config.json").read_text())
    assert [r["step"] for r in record["resumed"]] == [4]


class Terminated(Exception):
    pass


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_step_checkpoints_it_then_acts(finetune_config, tmp_path, monkeypatch,
                                                         number):
    """The signal is sent from inside step 2 of 4 (batch 1, one epoch, no periodic
    checkpoints): step 2 completes, is checkpointed, then the signal acts as before
    (SIGINT: KeyboardInterrupt; SIGTERM: the handler that was there, here one raising)."""
    whole = finetune(finetune_config(out=str(tmp_path / "whole"), batch_size=1),
                     progress=False)

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    out = tmp_path / "signalled"
    config = finetune_config(out=str(out), batch_size=1)
    try:
        interrupt_at(monkeypatch, 2, lambda: os.kill(os.getpid(), number))
        expected = Terminated if number == signal.SIGTERM else KeyboardInterrupt
        with pytest.raises(expected):
            finetune(config, progress=False)
        assert signal.getsignal(signal.SIGTERM) is terminate  # handlers put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert checkpoint_names(out) == ["step_2"]
    assert len((out / "loss_log.tsv").read_text().splitlines()) == 3  # header + 2 steps
    assert not (out / CLASSIFIER_WEIGHTS).exists()

    monkeypatch.undo()
    finetune(config, progress=False)
    a, b = load_file(str(whole / CLASSIFIER_WEIGHTS)), load_file(str(out / CLASSIFIER_WEIGHTS))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# -- file modes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"),
                         [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_honour_the_umask(finetune_config, tmp_path, monkeypatch, umask,
                                        file_mode, folder_mode):
    out = tmp_path / "clf"
    config = finetune_config(checkpoint_every=1)

    def modes():
        entries = [out, *out.rglob("*")]
        return {str(p.relative_to(out)): (stat.S_IMODE(p.stat().st_mode), p.is_dir())
                for p in entries}

    previous = os.umask(umask)
    try:
        interrupt_at(monkeypatch, 2)
        with pytest.raises(KeyboardInterrupt):
            finetune(config, progress=False)
        during = modes()
        monkeypatch.undo()
        finetune(config, progress=False)
        after = modes()
    finally:
        os.umask(previous)
    assert {"checkpoints/step_1", "checkpoints/step_1/weights.safetensors",
            "loss_log.tsv", "finetune_config.json"} <= set(during)
    assert {CLASSIFIER_WEIGHTS, "loss_curve.png", "finetune_config.json"} <= set(after)
    for name, (mode, is_folder) in [*during.items(), *after.items()]:
        assert mode == (folder_mode if is_folder else file_mode), (name, oct(mode))


# -- the LoRA folder's prompt and token ---------------------------------------------------------


def test_finetune_uses_the_prompt_and_token_a_lora_folder_records(finetune_config, tmp_path):
    lora = save_tiny_if2_lora(tmp_path / "lora")
    record = {"kind": "personalize", "certify": {"prompt": "art of a {}.", "token": "xyz"}}
    (lora / "adapt_config.json").write_text(json.dumps(record))
    assert recorded_lora_prompt(lora) == {"prompt": "art of a {}.", "token": "xyz"}

    out = finetune(finetune_config(lora=str(lora), sigmas=[0.5], batch_size=4),
                   progress=False)
    saved = json.loads((out / "finetune_config.json").read_text())
    assert saved["settings"]["prompt"] == "art of a {}." and saved["settings"]["token"] == "xyz"
    assert saved["denoiser_info"]["prompt"] == "art of a xyz."
    assert saved["certify"]["prompt"] == "art of a {}." and saved["certify"]["token"] == "xyz"

    # given values win, one by one; a folder without a record gives ""
    assert resolve_lora_prompt(lora, "a {} here", None) == ("a {} here", "xyz")
    assert resolve_lora_prompt(lora, None, "") == ("art of a {}.", "")
    assert resolve_lora_prompt(lora, "", None) == ("", "")  # the empty prompt, as asked
    assert resolve_lora_prompt(tmp_path, None, None) == ("", "")
    assert resolve_lora_prompt(None, None, None) == ("", "")


def test_personalize_records_what_certify_should_condition_on(personalize_config):
    previous = os.umask(0o022)
    try:
        out = personalize(personalize_config(steps=1, lam=0.0, prompt="art of a {}.",
                                             token="qq"), progress=False)
    finally:
        os.umask(previous)
    assert recorded_lora_prompt(out) == {"prompt": "art of a {}.", "token": "qq"}
    for name in (LORA_WEIGHTS, "adapt_config.json", "loss_log.tsv", "loss_curve.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# -- checkpoint variants ------------------------------------------------------------------------


def test_personalize_and_finetune_load_a_checkpoint_variant(personalize_config, finetune_config,
                                                            tiny, tmp_path):
    variant_only = str(tiny["if2_variant"])
    # only *.fp16.safetensors files there: named as such, not as missing
    with pytest.raises(UnreadableCheckpointError, match="--variant fp16"):
        personalize(personalize_config(checkpoint=variant_only, steps=1, lam=0.0,
                                       out=str(tmp_path / "no_variant")), progress=False)
    out = personalize(personalize_config(checkpoint=variant_only, variant="fp16", steps=1,
                                         lam=0.0), progress=False)
    record = json.loads((out / "adapt_config.json").read_text())
    assert record["settings"]["variant"] == "fp16" and (out / LORA_WEIGHTS).is_file()

    clf = finetune(finetune_config(denoiser_checkpoint=variant_only, variant="fp16",
                                   sigmas=[0.5], batch_size=4), progress=False)
    record = json.loads((clf / "finetune_config.json").read_text())
    assert record["settings"]["variant"] == "fp16"
    assert record["denoiser_info"]["variant"] == "fp16"


SIGTERM_CHILD = """
import os, signal, sys
import torch
torch.set_num_threads(1)
import adapt.finetune as module
from adapt.finetune import FinetuneConfig, finetune
from pathlib import Path
from tests.tiny_classifiers import clip_options, register_tiny_clip

references, out, clip, if2, cache = sys.argv[1:6]
register_tiny_clip(Path(clip).parent)  # the tiny architecture, known to open_clip
calls = {"n": 0}
original = module.classifier_logits

def logits(*args):
    calls["n"] += 1
    if calls["n"] == 2:  # during step 2 of 4: as a scheduler's preemption would
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args)

module.classifier_logits = logits
finetune(FinetuneConfig(references=references, out=out, classifier="clip-b32",
                        classifier_options=clip_options(clip, cache), denoiser_checkpoint=if2,
                        epochs=1, lr=1e-3, batch_size=1, checkpoint_every=0, resolution=32),
         progress=False)
print("finished although terminated")
"""


@pytest.mark.slow
def test_sigterm_with_its_default_action_ends_the_process_after_the_checkpoint(tiny, tmp_path):
    """A real process under SIGTERM's default action: step 2 is checkpointed, then the
    process ends by the signal (not by an exception of ours)."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "clf"
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run(
        [sys.executable, "-c", SIGTERM_CHILD, str(tiny["references"]), str(out),
         str(tiny["clip"]), str(tiny["if2"]), str(tmp_path / "cache")],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == -signal.SIGTERM, child.stdout + child.stderr
    assert "finished although terminated" not in child.stdout
    assert checkpoint_names(out) == ["step_2"]
    assert not (out / CLASSIFIER_WEIGHTS).exists()
