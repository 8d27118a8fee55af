"""The embedded worlds difflora measures itself on, each a base model drawing the procedural faces.

- "sd": the SD1-architecture U-Net (ε-prediction), shipped in assets/toy_base (the default model);
- "flow": the Z-Image flow-matching DiT of toy/flow_model.py, which also edits (a "before" image as its control).
  It ships as assets/toy_flow (`difflora toy train-base --world flow` reproduces it); `--model FOLDER` names
  another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class World:
    name: str
    title: str
    edits: bool  # the base model also takes a control image (the edit methods run on it)
    asset: Path | None  # the shipped model folder; None: load_model's embedded default

    def model_path(self, given: str | None) -> str | None:
        """The model to run: `given` (--model), else the shipped one; one line (exit 2) when it is not installed."""
        if given:
            return given
        if self.asset is None:
            return None
        if not (self.asset / "model_index.json").exists():
            raise UserError(f"the {self.name} world's model is not installed; pass --model FOLDER (the output of "
                            f"`difflora toy train-base --world {self.name}`)")
        return str(self.asset)


WORLDS: dict[str, World] = {
    "sd": World("sd", "SD1-architecture U-Net (ε-prediction)", edits=False, asset=None),
    "flow": World("flow", "Z-Image flow-matching DiT (text-to-image and edit)", edits=True, asset=ASSETS / "toy_flow"),
}
