"""GPU memory per image of DenoiseAndClassify(IF-II-L, CLIP ViT-B/32), estimated without a GPU.

`python -m bench.gpu_memory` builds both networks from their public architectures with
random weights on the meta device (shapes, no data: nothing is downloaded, nothing is
allocated), runs the real `IF2Denoiser` and `CLIPZeroShotClassifier` forward code at a
few batch sizes under `tests.tensor_memory.PeakTensorMemory`, which counts the bytes of
live tensors op by op, and fits peak = fixed + per_image * batch. It then checks the
method on the test suite's tiny IF-II + tiny CLIP: the same count on the CPU, with real
tensors, against the meta count.

What it is not: a CUDA measurement. It leaves out the CUDA context (~0.5-1 GB), cuDNN
workspaces and the caching allocator's fragmentation, which is why the micro-batch
default spends only `FREE_MEMORY_SHARE` of the free memory. Attention is counted as
the meta device runs it, with the score matrix materialized (the "math" path), which is
more than flash or memory-efficient attention need on a GPU.

IF-II-L's UNet is the `UNet2DConditionModel` of `DeepFloyd/IF-II-L-v1.0/unet/config.json`
(the diffusers conversion of DeepFloyd's stage-II config, `scripts/convert_if.py`): 1.24B
parameters, which matches the 4.97 GB of its fp32 weights. The prompt embedding is T5-XXL's
[1, 77, 4096] (IF's tokenizer pads to 77).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from classifiers.clip import CLIPZeroShotClassifier
from denoisers.if2 import IF2Denoiser
from denoisers.pipeline import DenoiseAndClassify

IF2_L_UNET_CONFIG = dict(
    sample_size=256, in_channels=6, out_channels=6,
    block_out_channels=(160, 320, 640, 960, 1280), layers_per_block=(2, 2, 3, 5, 5),
    down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("SimpleCrossAttnDownBlock2D",) * 2,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",) * 3,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    attention_head_dim=64, cross_attention_dim=1280, cross_attention_norm="group_norm",
    encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
    addition_embed_type="text", addition_embed_type_num_heads=64,
    class_embed_type="timestep", act_fn="gelu", norm_num_groups=32,
    resnet_time_scale_shift="scale_shift", resnet_skip_time_act=True,
    resnet_out_scale_factor=1.4142271248762552, mid_block_scale_factor=1.4142271248762552,
    time_embedding_act_fn="gelu", time_embedding_dim=1280, only_cross_attention=False,
)
T5_XXL_PROMPT = (77, 4096)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 2**30


class RandomHeadCLIP(CLIPZeroShotClassifier):
    """CLIP's real image side with random unit class embeddings: embedding 1,000 class
    names with 80 templates through a random text tower would cost minutes, and the text
    side is computed once per run, not per image."""

    def rebuild_class_embeddings(self, *, use_cache: bool = True) -> torch.Tensor:
        width = self.model.text_projection.shape[1]
        device = self.model.text_projection.device
        self.class_embeddings = F.normalize(
            torch.randn(len(self.class_names), width, device=device), dim=-1
        )
        return self.class_embeddings


def if2_l_clip_b32(dtype: torch.dtype, device: str = "meta") -> tuple[DenoiseAndClassify, int]:
    """The pipeline with IF-II-L and CLIP ViT-B/32 architectures, and its parameter bytes."""
    import open_clip
    from diffusers import DDPMScheduler, UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**IF2_L_UNET_CONFIG).to(dtype)
    # Built on the CPU (open_clip moves it to `device` itself, which a meta build refuses)
    # and kept in fp32, as the CLI keeps classifiers (its --dtype is autocast there, which
    # the meta device cannot run): an upper bound for CLIP's small share.
    clip = open_clip.create_model(
        "ViT-B-32", pretrained=None, force_quick_gelu=True, device=device
    )
    scheduler = DDPMScheduler(  # IF-II's denoising scheduler (as tests/tiny_models.py)
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range", prediction_type="epsilon",
    )
    prompt = torch.zeros((1, *T5_XXL_PROMPT), dtype=dtype, device=device)
    denoiser = IF2Denoiser(unet, scheduler, prompt, 0.5).to(device)
    classifier = RandomHeadCLIP(
        clip, None, [f"class {i}" for i in range(1000)], ["{}"], arch="ViT-B-32"
    ).to(device)
    parameters = sum(p.numel() * p.element_size() for p in unet.parameters())
    parameters += sum(p.numel() * p.element_size() for p in clip.parameters())
    return DenoiseAndClassify(denoiser, classifier).eval(), parameters


def traced_peak(model: torch.nn.Module, batch: int, size: int, device: str) -> int:
    # imported here: `bench.gpu_throughput` uses this module where `tests` may not be ours
    # (a top-level `tests` package of some installed distribution would shadow it)
    from tests.tensor_memory import PeakTensorMemory

    noisy = torch.zeros((batch, 3, size, size), device=device)
    with torch.inference_mode(), PeakTensorMemory() as memory:
        model(noisy)
    return memory.peak


def per_image(model: torch.nn.Module, size: int, device: str, batches=(1, 2, 4)) -> dict:
    """Peaks at a few batch sizes, and the slope and intercept of their straight line."""
    peaks = {b: traced_peak(model, b, size, device) for b in batches}
    slope = (peaks[batches[-1]] - peaks[batches[0]]) / (batches[-1] - batches[0])
    return {"peaks": peaks, "per_image": slope, "fixed": peaks[batches[0]] - slope * batches[0]}


def tiny_pipeline_check() -> dict:
    """The tiny IF-II + tiny CLIP traced on the CPU (real tensors) and on the meta device."""
    from classifiers import build_classifier
    from denoisers import DENOISERS
    from tests.tiny_classifiers import clip_options, save_tiny_clip
    from tests.tiny_models import save_tiny_if2

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        denoiser = DENOISERS.build("if2", sigma=0.5, checkpoint=str(save_tiny_if2(root / "if2")))
        options = clip_options(save_tiny_clip(root / "clip"), root / "cache")
        classifier = build_classifier("clip-b32", class_names=["cat", "dog", "car"], **options)
    model = DenoiseAndClassify(denoiser, classifier).eval()
    cpu = per_image(model, 32, "cpu")
    meta = per_image(model.to("meta"), 32, "meta")
    return {"cpu": cpu, "meta": meta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--share", type=float, default=None,
                        help="share of the free memory to fill [default: the pipeline's]")
    parser.add_argument("--out", default="runs/gpu_memory.json")
    args = parser.parse_args()
    from denoisers.pipeline import FREE_MEMORY_SHARE

    share = FREE_MEMORY_SHARE if args.share is None else args.share
    record = {"size": args.size, "gpu_gib": args.gpu_gib, "share": share, "rows": []}
    check = tiny_pipeline_check()
    record["tiny_check"] = check
    print(f"tiny IF-II + tiny CLIP, 32x32, bytes per image: CPU {check['cpu']['per_image']:.0f},"
          f" meta {check['meta']['per_image']:.0f}")
    for name, dtype in DTYPES.items():
        model, parameters = if2_l_clip_b32(dtype)
        fit = per_image(model, args.size, "meta")
        free = args.gpu_gib * GIB - parameters
        fits = int(share * free // fit["per_image"])
        row = {"dtype": name, "parameter_bytes": parameters, **fit, "micro_batch_fits": fits}
        record["rows"].append(row)
        print(f"IF-II-L + CLIP-B/32 {name} at {args.size}: weights {parameters / GIB:.2f} GiB, "
              f"{fit['per_image'] / GIB:.3f} GiB per image (+{fit['fixed'] / GIB:.2f} GiB "
              f"fixed); micro-batch for {args.gpu_gib:g} GiB at {share:.0%}: {fits}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
