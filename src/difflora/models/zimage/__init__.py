"""Z-Image (Tongyi-MAI's 6B single-stream DiT, Turbo and Base): the registry's entry points.

Light on purpose (config.py builds the job schema from the registry): torch-heavy modules load in `load`.
Package: transformer.py (diffusers' class with ComfyUI's fused qkv, both weight layouts), model.py (the
family), files.py (folders and ComfyUI's files), lora.py (LoRA names), options.py (job keys), tiny.py.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError
from .options import SHARED_FLOW_KEYS, ZIMAGE_ONLY_KEYS, ZImageJobOptions

NAMES = ("zimage",)
TITLE = "Z-Image (Turbo, Base)"

# ADDifT on Z-Image: TrainTrain (hako-mikan/sd-webui-traintrain 7b58929, "fix zimage") has no Z-Image preset;
# its Z-Image path trains only modules named "layers" (our default set), turns the SNR weighting off and uses
# the Action_XL preset's values: rank 4, alpha 1, lr 2e-4, timesteps 500-1000, multiplier 0.25. 100 steps as
# on SDXL (the preset's 30 are with CAME at batch 1). Not measured on Z-Image weights here.
METHOD_DEFAULTS = {
    "addift": {"max_train_steps": 100, "learning_rate": 2e-4, "network_dim": 4, "network_alpha": 1.0,
               "addift": {"min_timestep": 500, "max_timestep": 1000, "multiplier": 0.25}},
}

__all__ = ["METHOD_DEFAULTS", "NAMES", "SHARED_FLOW_KEYS", "TITLE", "ZIMAGE_ONLY_KEYS", "ZImageJobOptions",
           "detect_folder", "detect_single_file", "load"]


def detect_folder(path: Path, index: dict) -> str | None:
    cls = str(index.get("_class_name", ""))
    if not cls.startswith("ZImage"):
        return None
    if "Omni" in cls or "ControlNet" in cls:
        raise UserError(f"this is a {cls} folder; difflora trains Z-Image Turbo and Base (ZImagePipeline)", path=path)
    return "zimage"


def detect_single_file(keys, metadata: dict[str, str] | None = None) -> str | None:
    bare = {k.split("diffusion_model.", 1)[-1] for k in keys}
    if "cap_pad_token" not in bare or "x_pad_token" not in bare or "noise_refiner.0.feed_forward.w1.weight" not in bare:
        return None
    if "siglip_embedder.0.weight" in bare:
        raise UserError("this is a Z-Image Omni transformer (siglip_embedder), which difflora does not train; "
                        "use Z-Image Turbo or Base")
    return "zimage"


def load(path, *, family: str = "zimage", dtype=None, allow_pickle: bool = False, prediction_type=None, clip_skip=None,
         checkpoint=None, zero_terminal_snr=None, job=None, **options):
    """The registry's loader: the job's Z-Image keys (options.py) name the variant and the single files;
    `options` (zimage_variant, text_encoder, vae, qwen3_tokenizer, fp8_base) override them."""
    import torch

    from ..flow_matching import FlowMatchOptions
    from .model import TRAIN_FLOW

    if prediction_type not in (None, "flow"):
        raise UserError(f"Z-Image is a flow-matching model; prediction type {prediction_type!r} does not apply",
                        path=path)
    if clip_skip is not None:
        raise UserError("clip_skip does not apply to Z-Image (its Qwen3 text encoder is read at the second-to-last "
                        "layer, as the pipeline does)", path=path)
    dtype = dtype or torch.float32
    flow = None
    settings = dict(options)
    if job is not None:
        if job.mixed_precision == "bf16" or job.fp8_base:
            dtype = torch.bfloat16
        settings = {"zimage_variant": job.zimage_variant, "text_encoder": job.text_encoder, "vae": job.vae,
                    "qwen3_tokenizer": job.qwen3_tokenizer, "fp8_base": job.fp8_base,
                    **{k: v for k, v in options.items() if v is not None}}
        given = job.model_fields_set  # a FLUX default is not a Z-Image one: only keys the job sets
        base = TRAIN_FLOW
        flow = FlowMatchOptions(*(getattr(job, k) if k in given else getattr(base, k)
                                  for k in ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift",
                                            "model_prediction_type")))
    unknown = sorted(set(settings) - {"zimage_variant", "text_encoder", "vae", "qwen3_tokenizer", "fp8_base"})
    if unknown:
        raise UserError(f"options {', '.join(unknown)} do not apply to Z-Image models", path=path)
    path = Path(path)
    variant = settings.get("zimage_variant")
    if path.is_dir():
        from .files import load_folder

        stray = [k for k in ("text_encoder", "vae", "qwen3_tokenizer") if settings.get(k)]
        if stray:
            raise UserError(f"{', '.join(stray)} name files for a single-file transformer; a diffusers folder has "
                            "its own", path=path)
        model = load_folder(path, dtype=dtype, variant=variant, flow=flow)
    else:
        from .files import load_single_file

        model = load_single_file(path, checkpoint=checkpoint, dtype=dtype, variant=variant, flow=flow,
                                 text_encoder=settings.get("text_encoder"), vae=settings.get("vae"),
                                 qwen3_tokenizer=settings.get("qwen3_tokenizer"))
    if settings.get("fp8_base"):
        model.store_base_fp8()
    if job is not None and job.nf4_base:
        model.store_base_nf4()
    return model
