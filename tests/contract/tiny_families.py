"""How each registered model family takes part in the contract suite: its tiny model and how to read its denoiser.

A family joins the suite with one `TinyFamily` entry in `TINY_FAMILIES`, keyed by each of its `model_family`
names; `test_every_registered_family_takes_part` fails for a registered family without one (nothing is skipped).

- `build(folder)`: save a tiny model of the family there (the real block counts at narrow widths, fast: a training
  step well under a second on one CPU thread);
- `resolution`: the training side in pixels the tiny model runs at;
- `read(model, args, kwargs)`: what the denoiser's forward received, as `DenoiserInputs` on the training scale
  (latents unpacked to (B, C, h, w), timesteps 0-1000, the text tokens, the pooled text if any, the rest by name);
- `text_key` / `pooled_key`: where `encode_prompts` puts what `read` returns as `text` / `pooled`;
- `check_extras(inputs, row, image_hw, job)`: the family's own per-sample conditioning of one row, for the image
  of `image_hw` (pixels of the file before resizing) it was identified as; returns a problem or None;
- `client_unet(model_dir, lora_path, inputs)`: the denoiser output of the client's own LoRA loader (diffusers'
  `load_lora_weights`) on inputs {"x", "t", "cond"} (what `ModelFamily.predict` takes), or None where the family
  has none here;
- `saved_modules()`: the module names every LoRA the suite trains must hold (the reference key list), or None;
- `variant_of`: for an entry that is another variant of a registered family (its own key, e.g. "flux2-dev"):
  that family. Variants train every method and every adapter (`test_each_variant_...`); the family-wide checks
  (per-pair stages, resume) run on the family's own entry only.

The plug-in interface (models/plugin.py) may later give a family a `tiny_model(folder)` hook; this table is then
its test-side half (the reader).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class DenoiserInputs:
    latents: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,) on the 0-1000 training scale
    text: torch.Tensor  # (B, tokens, dim)
    pooled: torch.Tensor | None = None  # (B, dim)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TinyFamily:
    build: Callable[[Path], None]
    resolution: int
    read: Callable[[object, tuple, dict], DenoiserInputs]
    text_key: str
    pooled_key: str | None = None
    check_extras: Callable[[DenoiserInputs, int, tuple[int, int], object], str | None] = lambda *a: None
    client_unet: Callable[[Path, Path, dict], torch.Tensor] | None = None
    job_keys: dict = field(default_factory=dict)
    saved_modules: Callable[[], set[str]] | None = None
    variant_of: str | None = None


# ---------------------------------------------------------------------------- U-Net families
def _read_unet(model, args, kwargs) -> DenoiserInputs:
    sample, timestep = args[0], args[1]
    hs = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
    added = kwargs.get("added_cond_kwargs") or {}
    t = timestep.expand(sample.shape[0]) if timestep.dim() == 0 else timestep
    return DenoiserInputs(sample.detach(), t.detach().float(), hs.detach(),
                          added["text_embeds"].detach() if "text_embeds" in added else None,
                          {k: v.detach() for k, v in added.items() if k != "text_embeds"})


def _sdxl_size_conditioning(inputs: DenoiserInputs, row: int, image_hw: tuple[int, int], job) -> str | None:
    """SDXL's time_ids: the image's size before resizing, (crop), the size trained at (the suite's jobs do not
    bucket: the job's resolution)."""
    ids = inputs.extras.get("time_ids")
    if ids is None:
        return "no time_ids"
    h = w = job.resolution
    got = [float(v) for v in ids[row]]
    if got[0:2] != [float(image_hw[0]), float(image_hw[1])] or got[4:6] != [float(h), float(w)]:
        return f"time_ids {got}, expected original {image_hw} and target {(h, w)}"
    return None


def _client_unet_sd(pipeline_class: str):
    def run(model_dir: Path, lora_path: Path, inputs: dict) -> torch.Tensor:
        import diffusers

        x, t, cond = inputs["x"], inputs["t"], inputs["cond"].tensors
        pipe = getattr(diffusers, pipeline_class).from_pretrained(model_dir, local_files_only=True)
        added = None
        if "text_embeds" in cond:  # SDXL, at the pipeline's own time_ids: no crop, the output size
            h, w = (s * pipe.vae_scale_factor for s in x.shape[-2:])
            added = {"text_embeds": cond["text_embeds"], "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=x.dtype)}
        pipe.load_lora_weights(str(lora_path), adapter_name="x")
        with torch.no_grad():
            return pipe.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
    return run


def _build_sd(variant: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        from difflora.toy.tiny import build_tiny_sd

        build_tiny_sd(variant, layout="small").save(folder)
    return build


def _build_sdxl(folder: Path) -> None:
    from difflora.toy.tiny_sdxl import build_tiny_sdxl

    build_tiny_sdxl().save(folder)


# ---------------------------------------------------------------------------- FLUX
def _read_flux(model, args, kwargs) -> DenoiserInputs:
    """BFL's forward(img, img_ids, txt, txt_ids, timesteps, y, guidance): packed tokens with (t, row, column) ids,
    the target's at t = 0 first, a Kontext control's (t = 1) after them."""
    from difflora.models.flux.model import unpack_latents

    img, img_ids, txt, _txt_ids, timesteps, pooled, guidance = args[:7]
    target = img_ids[0, :, 0] == 0
    n = int(target.sum())
    h = int(img_ids[0, target, 1].max()) + 1
    w = int(img_ids[0, target, 2].max()) + 1
    extras = {} if guidance is None else {"guidance": guidance.detach()}
    if img.shape[1] > n:  # the control image (the tests' controls have the target's size)
        extras["control"] = unpack_latents(img[:, n:].detach(), 2 * h, 2 * w)
    return DenoiserInputs(unpack_latents(img[:, :n].detach(), 2 * h, 2 * w), timesteps.detach().float() * 1000,
                          txt.detach(), pooled.detach(), extras)


def _flux_guidance(inputs: DenoiserInputs, row: int, image_hw, job) -> str | None:
    g = inputs.extras.get("guidance")
    if g is None:
        return "no guidance"
    return None if float(g[row]) == float(job.guidance_scale) else f"guidance {float(g[row])}, job {job.guidance_scale}"


def _build_flux(folder: Path) -> None:
    from difflora.toy.tiny_flux import build_tiny_flux

    build_tiny_flux("dev", 1, 1).save(folder)


def _build_flux_kontext(folder: Path) -> None:
    """A FluxKontextPipeline folder: FLUX.1-dev's block names (what the flux entry trains), taking a control."""
    from difflora.toy.tiny_flux import build_tiny_flux

    build_tiny_flux("kontext", 1, 1).save(folder)


# ---------------------------------------------------------------------------- Z-Image
def _read_zimage(model, args, kwargs) -> DenoiserInputs:
    """ZImageTransformer2DModel(x: [(C, 1, h, w)], t = 1 - σ, caps: [(tokens, dim)]): back on the training scale,
    the captions zero-padded to the stored encoding's length."""
    from difflora.models.zimage.model import MAX_SEQUENCE_LENGTH

    x, t, caps = args[:3]
    text = torch.zeros(len(caps), MAX_SEQUENCE_LENGTH, caps[0].shape[-1], dtype=caps[0].dtype)
    for i, c in enumerate(caps):
        text[i, : c.shape[0]] = c.detach()
    return DenoiserInputs(torch.stack([xi.detach().squeeze(1) for xi in x]), (1 - t.detach().float()) * 1000, text)


def _build_zimage(folder: Path) -> None:
    from difflora.models.zimage.tiny import build_tiny_zimage

    build_tiny_zimage("turbo").save(folder)


def _client_zimage(model_dir: Path, lora_path: Path, inputs: dict) -> torch.Tensor:
    """diffusers' ZImagePipeline.load_lora_weights; its transformer at 1 - σ, output negated (the pipeline's)."""
    from diffusers import ZImagePipeline

    x, t, cond = inputs["x"], inputs["t"], inputs["cond"].tensors
    pipe = ZImagePipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.load_lora_weights(str(lora_path), adapter_name="x")
    caps = [c[m] for c, m in zip(cond["cap"], cond["cap_mask"].bool())]
    with torch.no_grad():
        out = pipe.transformer(list(x.unsqueeze(2).unbind(0)), (1000 - t.float()) / 1000, caps, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


# ---------------------------------------------------------------------------- the template family (tests only)
# model_family name -> module of the families that exist only in the tests (test_contract registers them)
TEST_FAMILIES = {"template": "template_family"}


def _read_template(model, args, kwargs) -> DenoiserInputs:
    x, t, text = args[:3]
    return DenoiserInputs(x.detach(), t.detach().float(), text.detach())


def _build_template(folder: Path) -> None:
    from template_family.model import build

    build(seed=4).save(folder)


# ---------------------------------------------------------------------------- Qwen-Image
def _read_qwen_image(model, args, kwargs) -> DenoiserInputs:
    """diffusers' QwenImageTransformer2DModel.forward keywords: packed tokens (the target's first), the text
    before txt_norm, σ as the timestep."""
    from difflora.models.qwen_image.model import unpack_latents

    shapes = kwargs["img_shapes"][0]
    _, h, w = shapes[0]
    tokens = kwargs["hidden_states"][:, : h * w].detach()
    extras = {}
    if len(shapes) > 1:  # an edit model's first control image, right after the target's tokens
        _, ch, cw = shapes[1]
        extras["control"] = unpack_latents(kwargs["hidden_states"][:, h * w: h * w + ch * cw].detach(), 2 * ch, 2 * cw)
    return DenoiserInputs(unpack_latents(tokens, 2 * h, 2 * w), kwargs["timestep"].detach().float() * 1000,
                          kwargs["encoder_hidden_states"].detach(), None, extras)


def _build_qwen_image_edit(folder: Path) -> None:
    from difflora.models.qwen_image.tiny import write_tiny_folder

    write_tiny_folder(folder, "edit")  # the real 60 blocks (processor/ included: control images of <= 16 tokens)


def _build_qwen_image(folder: Path) -> None:
    from difflora.models.qwen_image.tiny import write_tiny_folder

    write_tiny_folder(folder)  # the real 60 blocks, 8 wide


def _qwen_image_reference_modules(convention: str) -> Callable[[], set[str]]:
    """musubi's names at the real 60 blocks (tests/data/qwen_image_keys): "kohya" its 840 default modules,
    "all_linear_kohya" every Linear (846: the embedders and output layers too, what a job's conv_dim trains)."""
    def modules() -> set[str]:
        path = Path(__file__).parents[1] / "data" / "qwen_image_keys" / f"qwen_image_{convention}.txt"
        return set(path.read_text(encoding="utf-8").split())
    return modules


def _client_qwen_image(model_dir: Path, lora_path: Path, inputs: dict) -> torch.Tensor:
    from diffusers import QwenImagePipeline

    from difflora.models.qwen_image.model import pack_latents, unpack_latents

    x, t, cond = inputs["x"], inputs["t"], inputs["cond"].tensors
    pipe = QwenImagePipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.load_lora_weights(str(lora_path), adapter_name="x")
    h, w = x.shape[-2:]
    with torch.no_grad():
        out = pipe.transformer(hidden_states=pack_latents(x), encoder_hidden_states=cond["txt"],
                               encoder_hidden_states_mask=cond["txt_mask"], timestep=t.float() / 1000,
                               img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0], return_dict=False)[0]
    return unpack_latents(out, h, w)


# ---------------------------------------------------------------------------- FLUX.2
def _read_flux2(model, args, kwargs) -> DenoiserInputs:
    """diffusers' Flux2Transformer2DModel takes keywords: tokens (B, h·w, 128) with their (t, row, column, 0) ids."""
    x, ids = kwargs["hidden_states"], kwargs["img_ids"]
    ids = ids[0] if ids.dim() == 3 else ids
    first = ids[:, 0] == ids[0, 0]  # the target's tokens (t = 0); reference images follow at t = 10, 20, ...
    h, w = int(ids[first, 1].max()) + 1, int(ids[first, 2].max()) + 1
    lat = x[:, : h * w].detach().transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    g = kwargs.get("guidance")
    extras = {} if g is None else {"guidance": g.detach()}
    if x.shape[1] > h * w:  # the first reference image (the tests' controls have the target's size)
        extras["control"] = x[:, h * w: 2 * h * w].detach().transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    return DenoiserInputs(lat, kwargs["timestep"].detach().float() * 1000, kwargs["encoder_hidden_states"].detach(),
                          None, extras)


def _build_flux2(size: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        from difflora.models.flux2.tiny import build_tiny_flux2

        build_tiny_flux2(size).save(folder)
    return build


def _flux2_reference_modules(size: str) -> Callable[[], set[str]]:
    """musubi's default modules of this size (the reference list tests/data/flux2_keys/flux2_<size>_kohya.txt)."""
    def modules() -> set[str]:
        path = Path(__file__).parents[1] / "data" / "flux2_keys" / f"flux2_{size.replace('-', '_')}_kohya.txt"
        return set(path.read_text(encoding="utf-8").split())
    return modules


def _client_flux2(model_dir: Path, lora_path: Path, inputs: dict) -> torch.Tensor:
    """diffusers' own FLUX.2 pipeline of the folder (Flux2KleinPipeline or dev's Flux2Pipeline) with its
    load_lora_weights; dev's embedded guidance at the training default, 1."""
    import json

    import diffusers

    from difflora.models.flux2.model import text_ids, token_ids

    x, t, txt = inputs["x"], inputs["t"], inputs["cond"].tensors["txt"]
    b, c, h, w = x.shape
    cls = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
    pipe = getattr(diffusers, cls).from_pretrained(model_dir, local_files_only=True)
    pipe.load_lora_weights(str(lora_path), adapter_name="x")
    guidance = torch.ones(b) if pipe.transformer.config.guidance_embeds else None
    with torch.no_grad():
        out = pipe.transformer(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=txt,
                               timestep=t.float() / 1000, img_ids=token_ids(b, h, w), txt_ids=text_ids(b, txt.shape[1]),
                               guidance=guidance, return_dict=False)[0]
    return out.transpose(1, 2).reshape(b, c, h, w)


def _flux2(size: str, variant_of: str | None = None) -> TinyFamily:
    # no conv_dim: FLUX.2 has no convs, and lora_targets(conv=True) is every Linear a file may hold (the embedders
    # and global modulation too, which diffusers' loader drops): the client comparison is on musubi's block set.
    # 16 prompt tokens, not the pipelines' 512: the text encoders and the joint attention at a tiny model's scale
    return TinyFamily(_build_flux2(size), 32, _read_flux2, "txt", client_unet=_client_flux2,
                      job_keys={"conv_dim": None, "text_encoder_max_token_length": 16},
                      saved_modules=_flux2_reference_modules(size), variant_of=variant_of)


TINY_FAMILIES: dict[str, TinyFamily] = {
    "qwen_image": TinyFamily(_build_qwen_image, 32, _read_qwen_image, "txt", client_unet=_client_qwen_image,
                             saved_modules=_qwen_image_reference_modules("all_linear_kohya")),
    "flux2": _flux2("klein-4b"),
    "flux2-klein-9b": _flux2("klein-9b", variant_of="flux2"),
    "flux2-dev": _flux2("dev", variant_of="flux2"),
    "sd1": TinyFamily(_build_sd("sd1"), 16, _read_unet, "encoder_hidden_states",
                      client_unet=_client_unet_sd("StableDiffusionPipeline")),
    "sd2": TinyFamily(_build_sd("sd2"), 16, _read_unet, "encoder_hidden_states",
                      client_unet=_client_unet_sd("StableDiffusionPipeline")),
    "sdxl": TinyFamily(_build_sdxl, 32, _read_unet, "encoder_hidden_states", "text_embeds",
                       check_extras=_sdxl_size_conditioning,
                       client_unet=_client_unet_sd("StableDiffusionXLPipeline")),
    "flux": TinyFamily(_build_flux, 32, _read_flux, "t5", "pooled", check_extras=_flux_guidance,
                       job_keys={"guidance_scale": 2.5}),
    "zimage": TinyFamily(_build_zimage, 32, _read_zimage, "cap", client_unet=_client_zimage,
                         job_keys={"zimage_variant": "turbo"}),
    "template": TinyFamily(_build_template, 16, _read_template, "text"),
}

# The edit-capable models the edit methods (Method.needs_control) run on, by label: a family's edit variant where it
# is not the family's default model (Qwen-Image-Edit), the family's own tiny model where that takes reference images.
EDIT_FAMILIES: dict[str, TinyFamily] = {
    # no conv_dim: the edit model's files hold musubi's default 840 modules
    "qwen_image_edit": TinyFamily(_build_qwen_image_edit, 32, _read_qwen_image, "txt",
                                  job_keys={"model_variant": "edit", "conv_dim": None},
                                  saved_modules=_qwen_image_reference_modules("kohya")),
    "flux2": TINY_FAMILIES["flux2"],
    "flux_kontext": TinyFamily(_build_flux_kontext, 32, _read_flux, "t5", "pooled", check_extras=_flux_guidance,
                               job_keys={"guidance_scale": 2.5}),
}
ALL_TINY = {**TINY_FAMILIES, **EDIT_FAMILIES}
