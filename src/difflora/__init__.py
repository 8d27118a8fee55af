"""difflora: LoRA training for diffusion models, best at learning the difference between images."""

__version__ = "0.1.0"
