"""The template family's model: components, the ModelFamily hooks, its folder layout and a tiny builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from difflora.errors import UserError
from difflora.fileio import load_safetensors, save_safetensors, write_json_atomic
from difflora.models.base import Conditioning, ModelFamily
from difflora.models.objectives import FlowMatchingObjective
from difflora.network.lora import LoRATarget

from . import PIPELINE_CLASS

CONFIG = {"latent_channels": 4, "width": 16, "text_dim": 8, "vocab": 128, "tokens": 12}


class TextEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embed = nn.Embedding(cfg["vocab"], cfg["text_dim"])
        self.proj = nn.Linear(cfg["text_dim"], cfg["text_dim"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


class Autoencoder(nn.Module):
    """2x down: pixels (B, 3, H, W) <-> latents (B, C, H/2, W/2)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.encoder = nn.Conv2d(3, cfg["latent_channels"], 2, stride=2)
        self.decoder = nn.ConvTranspose2d(cfg["latent_channels"], 3, 2, stride=2)


class Denoiser(nn.Module):
    """One conv block, told the time and the mean of the text tokens."""

    def __init__(self, cfg: dict):
        super().__init__()
        c, w = cfg["latent_channels"], cfg["width"]
        self.conv_in = nn.Conv2d(c, w, 3, padding=1)
        self.time_proj = nn.Linear(1, w)
        self.text_proj = nn.Linear(cfg["text_dim"], w)
        self.conv_out = nn.Conv2d(w, c, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        emb = self.time_proj(t.float()[:, None] / 1000) + self.text_proj(text.mean(1))
        return self.conv_out(F.silu(self.conv_in(x) + emb[:, :, None, None]))


class TemplateModel(ModelFamily):
    def __init__(self, denoiser: Denoiser, vae: Autoencoder, text_encoder: TextEncoder, cfg: dict, source: str = ""):
        self.denoiser, self.vae, self.cfg, self.source = denoiser, vae, dict(cfg), source
        self.text_encoders = {"text_encoder": text_encoder}
        self.family = "template"
        self.objective = FlowMatchingObjective()

    base_model_version = "template_v1"
    modelspec_architecture = "difflora-template/lora"
    resolution = 16
    latent_downscale = 2
    latent_multiple = 2

    def lora_metadata(self):
        return {"ss_base_model_version": self.base_model_version, "modelspec.architecture": self.modelspec_architecture}

    def lora_targets(self, conv: bool = False) -> list[LoRATarget]:
        d = self.denoiser
        out = [LoRATarget("lora_te_template_proj", self.text_encoders["text_encoder"].proj, "text_encoder")]
        out += [LoRATarget(f"lora_unet_template_{n}", m, "unet") for n, m in
                (("time_proj", d.time_proj), ("text_proj", d.text_proj))]
        if conv:
            out += [LoRATarget(f"lora_unet_template_{n}", m, "unet") for n, m in
                    (("conv_in", d.conv_in), ("conv_out", d.conv_out))]
        return out

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        n, vocab = self.cfg["tokens"], self.cfg["vocab"]
        ids = torch.tensor([[ord(ch) % vocab for ch in p[:n]] + [0] * (n - len(p[:n])) for p in prompts])
        return Conditioning({"text": self.text_encoders["text_encoder"](ids.to(self.device))})

    def predict(self, noisy, timesteps, cond):
        return self.denoiser(noisy, timesteps, cond.tensors["text"].to(noisy.dtype))

    def encode_images(self, pixels, sample=True, generator=None):
        return self.vae.encoder(pixels.to(self.device))

    def decode_latents(self, latents):
        return self.vae.decoder(latents)

    def pipeline_embeddings(self, cond, uncond):
        raise UserError("the template family generates with its own sampler, not a diffusers pipeline")

    def pipeline(self, scheduler: str = "ddim"):
        raise UserError("the template family generates with its own sampler, not a diffusers pipeline")

    @torch.no_grad()
    def generate_request(self, networks, req, batch_size=64, output="uint8", progress=None):
        """Euler steps of the flow from per-seed noise (no guidance): the family's own sampler."""
        out = []
        for start in range(0, len(req.prompts), batch_size):
            sl = slice(start, min(len(req.prompts), start + batch_size))
            for i, net in enumerate(networks):
                if req.multipliers.get(i) is not None:
                    net.set_multiplier(torch.tensor(req.multipliers[i][sl], dtype=torch.float32))
            cond = self.encode_prompts(req.prompts[sl])
            h, w = (req.height or self.resolution) // 2, (req.width or self.resolution) // 2
            x = torch.stack([torch.randn(self.cfg["latent_channels"], h, w, generator=torch.Generator().manual_seed(s))
                             for s in req.seeds[sl]]).to(self.device)
            sigmas = torch.linspace(1, 0, req.steps + 1)
            for cur, nxt in zip(sigmas[:-1], sigmas[1:]):
                v = self.predict(x, torch.full((x.shape[0],), float(cur) * 1000, device=x.device), cond)
                x = x + float(nxt - cur) * v
                if progress is not None:
                    progress.update(1)
            images = ((self.decode_latents(x).float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
            out += [img if output == "float" else (img * 255).round().astype(np.uint8) for img in images]
        return out

    def save(self, path, single_file=None, dtype=None):
        if single_file:
            raise UserError("the template family saves folders only", path=path)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"{part}.{k}": v.detach().contiguous() for part, m in
                   (("denoiser", self.denoiser), ("vae", self.vae), ("text_encoder", self.text_encoders["text_encoder"]))
                   for k, v in m.state_dict().items()}
        save_safetensors({k: v.to(dtype) if dtype else v for k, v in tensors.items()}, path / "weights.safetensors")
        write_json_atomic(path / "model_index.json", {"_class_name": PIPELINE_CLASS, "config": self.cfg})


def build(cfg: dict | None = None, seed: int = 0, source: str = "tiny template") -> TemplateModel:
    cfg = dict(cfg or CONFIG)
    torch.manual_seed(seed)
    model = TemplateModel(Denoiser(cfg), Autoencoder(cfg), TextEncoder(cfg), cfg, source)
    model.freeze()
    return model


def load(path: Path, dtype=torch.float32) -> TemplateModel:
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    if not (path / "weights.safetensors").is_file():
        raise UserError("template model folder has no weights.safetensors", path=path)
    model = build(index["config"], source=str(path))
    tensors, _ = load_safetensors(path / "weights.safetensors")
    for part, module in (("denoiser", model.denoiser), ("vae", model.vae),
                         ("text_encoder", model.text_encoders["text_encoder"])):
        module.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(part + ".")})
        module.to(dtype)
    return model
