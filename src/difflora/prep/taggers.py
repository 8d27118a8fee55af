"""Taggers that read local files only: WD14-style ONNX folders, transformers captioners, the toy judge.

Each tagger has `name` and `tag(images) -> list[list[str]]` (one tag list per RGB uint8 image; a
captioner returns one natural-language caption as its only "tag"). Everything that can be wrong
with a model folder is found when it is opened, before any caption file is written.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

log = logging.getLogger(__name__)

# WD14 family defaults (SmilingWolf's taggers; kohya's tag_images_by_wd14_tagger.py uses the same).
GENERAL_THRESHOLD = 0.35
CHARACTER_THRESHOLD = 0.85
WD14_DEFAULT_SIZE = 448
CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING = 0, 4, 9


def wd14_preprocess(img: np.ndarray, size: int) -> np.ndarray:
    """WD14's input: BGR, padded to a white square (centred), resized to size x size, float32 0..255, HWC."""
    h, w = img.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.full((side, side, 3), 255, np.uint8)
    square[top:top + h, left:left + w] = img[..., :3]
    if side != size:
        # The reference uses OpenCV's INTER_AREA to shrink and LANCZOS4 to enlarge; PIL's BOX and LANCZOS are those filters.
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.BOX if side > size else Image.LANCZOS))
    return square[..., ::-1].astype(np.float32)


class WD14Tagger:
    """`model.onnx` + `selected_tags.csv` (columns tag_id, name, category, count)."""

    def __init__(self, folder: Path, general_threshold: float = GENERAL_THRESHOLD,
                 character_threshold: float = CHARACTER_THRESHOLD, keep_underscores: bool = False,
                 include_rating: bool = False):
        self.folder = Path(folder)
        self.name = f"wd14:{self.folder.name}"
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.keep_underscores = keep_underscores
        self.include_rating = include_rating
        model_path, csv_path = self.folder / "model.onnx", self.folder / "selected_tags.csv"
        self.tags, self.categories = self._read_tags(csv_path)
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - a dependency
            raise UserError("onnxruntime is not installed; pip install onnxruntime") from None
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise UserError(f"cannot load the ONNX model ({str(e).splitlines()[0][:200]})", path=model_path) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise UserError(f"not a WD14-style tagger: it has {len(inputs)} inputs, expected one image input",
                            path=model_path)
        shape = list(inputs[0].shape)
        dims = [d if isinstance(d, int) else None for d in shape]
        if len(dims) != 4 or dims[3] != 3 or (dims[1] is not None and dims[2] is not None and dims[1] != dims[2]):
            raise UserError(f"not a WD14-style tagger: input {inputs[0].name!r} has shape {shape}, expected "
                            "[batch, size, size, 3] (NHWC, BGR)", path=model_path)
        if "float" not in inputs[0].type:
            raise UserError(f"not a WD14-style tagger: input type {inputs[0].type}, expected float32", path=model_path)
        self.size = dims[1] or dims[2] or WD14_DEFAULT_SIZE
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        n_out = self._probe()
        if n_out != len(self.tags):
            raise UserError(f"the tags file lists {len(self.tags)} tags but the model {model_path.name} outputs "
                            f"{n_out} scores; use the selected_tags.csv that came with this model", path=csv_path)

    @staticmethod
    def _read_tags(path: Path) -> tuple[list[str], list[int]]:
        if not path.is_file():
            raise UserError("tags file not found (a WD14 tagger folder holds model.onnx and selected_tags.csv)",
                            path=path)
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except (UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"cannot read the tags CSV ({e})", path=path) from None
        if not rows or "name" not in rows[0] or "category" not in rows[0]:
            raise UserError("not a WD14 tags file: expected a header with 'name' and 'category' columns", path=path)
        try:
            return [r["name"] for r in rows], [int(r["category"]) for r in rows]
        except (TypeError, ValueError) as e:
            raise UserError(f"bad category value in the tags CSV ({e})", path=path) from None

    def _probe(self) -> int:
        """Number of scores the model gives for one image (runs it once on a white image)."""
        dummy = np.full((1, self.size, self.size, 3), 255.0, np.float32)
        try:
            out = self.session.run([self.output_name], {self.input_name: dummy})[0]
        except Exception as e:
            raise UserError(f"the ONNX model fails on a {self.size}x{self.size} image "
                            f"({str(e).splitlines()[0][:200]})", path=self.folder / "model.onnx") from None
        out = np.asarray(out)
        if out.ndim != 2 or out.shape[0] != 1:
            raise UserError(f"not a WD14-style tagger: output shape {list(out.shape)}, expected [batch, tags]",
                            path=self.folder / "model.onnx")
        return int(out.shape[1])

    def scores(self, images: list[np.ndarray]) -> np.ndarray:
        batch = np.stack([wd14_preprocess(im, self.size) for im in images])
        out = np.asarray(self.session.run([self.output_name], {self.input_name: batch})[0], dtype=np.float64)
        if out.min() < 0 or out.max() > 1:  # an export without the final sigmoid
            out = 1.0 / (1.0 + np.exp(-out))
        return out

    def _spell(self, tag: str) -> str:
        return tag if self.keep_underscores or len(tag) <= 3 else tag.replace("_", " ")  # kaomoji keep "_"

    def tag(self, images: list[np.ndarray]) -> list[list[str]]:
        out = []
        for probs in self.scores(images):
            chosen = []
            for i, (p, cat) in enumerate(zip(probs, self.categories)):
                if cat == CATEGORY_CHARACTER and p >= self.character_threshold:
                    chosen.append((0, -p, i))
                elif cat == CATEGORY_GENERAL and p >= self.general_threshold:
                    chosen.append((1, -p, i))
            if self.include_rating:
                ratings = [i for i, c in enumerate(self.categories) if c == CATEGORY_RATING]
                if ratings:
                    chosen.append((2, 0.0, max(ratings, key=lambda i: probs[i])))
            # characters first, then general tags, each most confident first
            out.append([self._spell(self.tags[i]) for _, _, i in sorted(chosen)])
        return out


class Captioner:
    """A transformers image-to-text model folder (BLIP-style): one natural-language caption per image."""

    def __init__(self, folder: Path, max_new_tokens: int = 40, num_beams: int = 3):
        self.folder = Path(folder)
        self.name = f"captioner:{self.folder.name}"
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        try:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(self.folder, local_files_only=True).eval()
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load an image-captioning model from this folder ({str(e).splitlines()[0][:200]})",
                            path=self.folder) from None

    def tag(self, images: list[np.ndarray]) -> list[list[str]]:
        import torch

        inputs = self.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                      do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [[" ".join(t.split())] if t.strip() else [] for t in texts]


class ToyTagger:
    """The embedded world's tagger: the shipped judge, its reading written as a toy-face caption."""

    name = "toy"

    def __init__(self, weights: Path | None = None):
        from ..toy.judge import load_judge

        self.judge = load_judge(weights)

    def tag(self, images: list[np.ndarray]) -> list[list[str]]:
        from ..toy import faces

        return [faces.caption(attrs).split(", ") for attrs in self.judge.predict(images)]


def open_tagger(spec: str, **options) -> WD14Tagger | Captioner | ToyTagger:
    """`toy`, a WD14 folder (model.onnx + selected_tags.csv) or a transformers folder (config.json)."""
    if spec == "toy":
        return ToyTagger()
    folder = Path(spec)
    if not folder.exists():
        raise UserError("tagger folder not found (give a WD14 folder, a captioning model folder, or 'toy')",
                        path=folder)
    if folder.is_file() and folder.suffix == ".onnx":
        folder = folder.parent
    if (folder / "model.onnx").is_file():
        return WD14Tagger(folder, **{k: v for k, v in options.items() if k in (
            "general_threshold", "character_threshold", "keep_underscores", "include_rating")})
    if (folder / "config.json").is_file():
        return Captioner(folder, **{k: v for k, v in options.items() if k in ("max_new_tokens", "num_beams")})
    raise UserError("not a tagger folder: expected model.onnx + selected_tags.csv (WD14) or config.json "
                    "(a transformers captioning model)", path=folder)
