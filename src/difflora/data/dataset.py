"""Datasets in kohya's layout, bucketed, with cached latents and deterministic batches.

An epoch lists every item `num_repeats` times (regularisation subsets are repeated round-robin
until they match the training count, as kohya does), groups items by bucket, and cuts them into
global batches of `batch_size x world_size`; a bucket's last partial batch is completed by
wrapping around inside the bucket, so every process always gets the same number of samples.
Order, caption randomness and flips are derived from (seed, epoch), never from global RNG state.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import DatasetConfig, DatasetOptions, JobConfig, SubsetConfig
from ..errors import UserError
from ..models.base import SampleSize
from .captions import CaptionRules, read_caption
from .images import IMAGE_EXTENSIONS, is_image_file, load_image, resize_and_crop, to_tensor
from .instructions import instruction_for, instruction_path, read_instruction

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ buckets
def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """kohya's bucket list: a square plus every width in [min,max] with the height that fits the area."""
    max_w, max_h = max_reso
    max_area = max_w * max_h
    size = int(math.sqrt(max_area) // step * step)
    resos = {(size, size)}
    w = min_size
    while w <= max_size:
        h = min(max_size, int(max_area // w // step * step))
        if h >= min_size:
            resos.add((w, h))
            resos.add((h, w))
        w += step
    return sorted(resos)


def choose_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ar = size[0] / size[1]
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ar), -b[0] * b[1]))


def no_upscale_bucket(size: tuple[int, int], max_area: int, step: int) -> tuple[int, int]:
    w, h = size
    if w * h > max_area:
        s = math.sqrt(max_area / (w * h))
        w, h = w * s, h * s
    return max(step, int(w // step * step)), max(step, int(h // step * step))


def kohya_sample_size(original_wh: tuple[int, int], bucket_wh: tuple[int, int], flipped: bool) -> SampleSize:
    """SDXL's size conditioning of an image cut to a bucket, exactly as kohya computes it.

    kohya's crop corner (`BucketManager.get_crop_ltrb`, "as Stability AI's preprocessing") is where
    the image would sit if fitted *inside* the bucket, not where it was cropped; a flipped image
    mirrors it (left = bucket width - right). Kept as kohya has it: LoRAs trained on SDXL by kohya
    learn these values.
    """
    (w, h), (bw, bh) = original_wh, bucket_wh
    if bw / bh > w / h:
        fit_w, fit_h = bh * (w / h), bh
    else:
        fit_w, fit_h = bw, bw / (w / h)
    left, top = (bw - fit_w) // 2, (bh - fit_h) // 2
    if flipped:
        left = bw - (left + fit_w)
    return SampleSize(original_hw=(int(h), int(w)), crop_top_left=(int(top), int(left)), target_hw=(int(bh), int(bw)))


# ------------------------------------------------------------------ items
@dataclass
class Item:
    """One image (or pair) of the dataset."""

    path: Path
    caption: str
    rules: CaptionRules
    is_reg: bool = False
    flip_aug: bool = False
    after_path: Path | None = None  # pairs
    after_caption: str | None = None
    instruction: str | None = None  # a pair's NAME.instruction.txt (data/instructions.py), for the edit methods
    # a pair's further control images for the edit methods (NAME_ref1.png, NAME_ref2.png, ... next to the before
    # image), after the before image itself; their latents are "ref1", "ref2", ...
    ref_paths: tuple[Path, ...] = ()
    bucket: tuple[int, int] = (0, 0)
    original_size: tuple[int, int] = (0, 0)  # (w, h) before resizing: SDXL's size conditioning
    dataset_index: int = 0
    latents: dict[str, torch.Tensor] = field(default_factory=dict)  # "x", "x_flip", "after", "after_flip", "mask", ...
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)  # resized images when latents are not cached

    @property
    def is_pair(self) -> bool:
        return self.after_path is not None

    @property
    def image_keys(self) -> list[str]:
        """The item's images by latent key: "x", and for a pair "after" and its reference images "ref1", ..."""
        return ["x"] + (["after"] + [f"ref{i + 1}" for i in range(len(self.ref_paths))] if self.is_pair else [])

    def image_path(self, key: str) -> Path:
        if key == "x":
            return self.path
        if key == "after":
            return self.after_path
        return self.ref_paths[int(key[3:]) - 1]


REF_SUFFIX = re.compile(r"^(?P<base>.+)_ref(?P<n>[1-9]\d*)$")  # NAME_ref1: a further control image of NAME


def reference_images(before: Path, siblings: list[Path]) -> tuple[Path, ...]:
    """NAME_ref1, NAME_ref2, ... of the pair whose before image is `before`, in order; a gap ends them (refused)."""
    found = {}
    for p in siblings:
        m = REF_SUFFIX.match(p.stem)
        if m and m["base"] == before.stem:
            found[int(m["n"])] = p
    if sorted(found) != list(range(1, len(found) + 1)):
        missing = next(i for i in range(1, len(found) + 2) if i not in found)
        raise UserError(f"the control images of {before.name} skip {before.stem}_ref{missing} (they are numbered "
                        "_ref1, _ref2, ... without gaps)", path=before)
    return tuple(found[i] for i in sorted(found))


def split_control_images(images: list[Path]) -> tuple[list[Path], dict[Path, list[Path]]]:
    """(the images that are no further control image of another, {NAME's path without extension: its NAME_refN
    images}): NAME_refN is a control image of NAME when an image NAME.<ext> of the same folder is among `images`."""
    bases = {p.with_suffix("") for p in images}
    refs_of: dict[Path, list[Path]] = {}
    for p in images:
        m = REF_SUFFIX.match(p.stem)
        if m and p.with_name(m["base"]) in bases:
            refs_of.setdefault(p.with_name(m["base"]), []).append(p)
    refs = {p for found in refs_of.values() for p in found}
    return [p for p in images if p not in refs], refs_of


def _merge(*levels: DatasetOptions | SubsetConfig | None) -> dict:
    """Lower levels override higher ones (general < dataset < subset)."""
    out: dict = {}
    for level in levels:
        if level is None:
            continue
        for k, v in level.model_dump().items():
            if v is not None and k != "subsets":
                out[k] = v
    return out


def _rules(opts: dict) -> CaptionRules:
    return CaptionRules(
        shuffle_caption=bool(opts.get("shuffle_caption", False)),
        keep_tokens=int(opts.get("keep_tokens", 0)),
        keep_tokens_separator=opts.get("keep_tokens_separator") or "",
        caption_separator=opts.get("caption_separator") or ",",
        caption_prefix=opts.get("caption_prefix") or "",
        caption_suffix=opts.get("caption_suffix") or "",
        caption_dropout_rate=float(opts.get("caption_dropout_rate", 0.0)),
        caption_dropout_every_n_epochs=int(opts.get("caption_dropout_every_n_epochs", 0)),
        caption_tag_dropout_rate=float(opts.get("caption_tag_dropout_rate", 0.0)),
    )


def _caption_for(image: Path, opts: dict) -> str:
    ext = opts.get("caption_extension")
    candidates = [ext] if ext else [".caption", ".txt"]
    for e in candidates:
        cap = image.with_name(image.stem + (e if e.startswith(".") else "." + e))
        if cap.exists():
            return read_caption(cap)
    return opts.get("class_tokens") or ""


def _images_in(folder: Path, exclude_suffix: str | None = None) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if exclude_suffix:
        files = [p for p in files if not p.stem.endswith(exclude_suffix)]
    return files


def legacy_subsets(train_data_dir: str, reg_data_dir: str | None) -> list[SubsetConfig]:
    """kohya's `<repeats>_<class tokens>` folder convention."""
    subsets = []
    for root, is_reg in ((train_data_dir, False), (reg_data_dir, True)):
        if root is None:
            continue
        root_p = Path(root)
        if not root_p.is_dir():
            raise UserError("training data folder not found" if not is_reg else "regularisation folder not found", path=root_p)
        found = False
        for sub in sorted(p for p in root_p.iterdir() if p.is_dir()):
            m = re.match(r"^(\d+)_(.*)$", sub.name)
            if not m:
                log.warning("%s: ignored (folder names must be <repeats>_<name>, e.g. 10_face)", sub)
                continue
            found = True
            subsets.append(SubsetConfig(image_dir=str(sub), num_repeats=int(m.group(1)), class_tokens=m.group(2) or None,
                                        is_reg=is_reg))
        if not found and not is_reg:
            raise UserError("no data found: the folder has no <repeats>_<name> subfolders (e.g. 10_face)", path=root_p)
    return subsets


class TrainingData:
    """All items of a job, bucketed; produces the global batches of each epoch."""

    def __init__(self, job: JobConfig, resolution: int, bucket_step: int, pairs: bool):
        self.job = job
        self.pairs = pairs
        self.items: list[Item] = []
        self.batch_sizes: list[int] = []
        self.skipped: list[str] = []
        self.validation_items: list[Item] = []  # held out (validation_split) or from validation_data_dir
        self._epoch_cache: dict = {}
        self._sizes: dict[Path, tuple[int, int]] = {}
        datasets = job.datasets
        if not datasets:
            datasets = [DatasetConfig(subsets=legacy_subsets(job.train_data_dir, job.reg_data_dir))]
        # kohya precedence: top-level job keys < [general] < [[datasets]] < [[datasets.subsets]]
        top = DatasetOptions.model_validate({k: getattr(job, k) for k in DatasetOptions.model_fields})
        for di, ds in enumerate(datasets):
            ds_opts = _merge(top, job.general, ds)
            res = ds_opts.get("resolution") or resolution
            reso = (res, res) if isinstance(res, int) else tuple(res)
            step = int(ds_opts.get("bucket_reso_steps") or bucket_step)
            if step % bucket_step != 0:
                raise UserError(f"bucket_reso_steps = {step} must be a multiple of {bucket_step} for this model")
            if reso[0] % bucket_step or reso[1] % bucket_step:
                raise UserError(f"resolution {reso[0]}x{reso[1]} must be a multiple of {bucket_step} for this model")
            enable = bool(ds_opts.get("enable_bucket", False))
            no_up = bool(ds_opts.get("bucket_no_upscale", False))
            min_r = int(ds_opts.get("min_bucket_reso") or min(256, min(reso)))
            max_r = int(ds_opts.get("max_bucket_reso") or max(1024, max(reso)))
            buckets = make_bucket_resolutions(reso, min_r, max_r, step) if enable else [reso]
            self.batch_sizes.append(int(ds_opts.get("batch_size") or job.train_batch_size))
            train_items, reg_items = [], []
            for sub in ds.subsets:
                opts = _merge(top, job.general, ds, sub)
                items = self._subset_items(sub, opts, di)
                for it in items:
                    it.bucket = self._bucket_for(it, buckets, enable, no_up, reso, step)
                    it.original_size = self._sizes[it.path]
                repeats = int(opts.get("num_repeats", 1))
                (reg_items if it_is_reg(sub, opts) else train_items).append((items, repeats))
            if job.validation_data_dir and di == 0:
                self._validation_folder(ds, _merge(top, job.general, ds, ds.subsets[0]), di,
                                        lambda it: self._bucket_for(it, buckets, enable, no_up, reso, step))
            elif job.validation_split:
                train_items = self._hold_out(train_items, job.validation_split, di)
            self._add_with_repeats(train_items, reg_items)
        if not self.items:
            raise UserError("no usable training images were found (check image_dir and the file extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)})")

    # -- building
    def _subset_items(self, sub: SubsetConfig, opts: dict, di: int) -> list[Item]:
        folder = Path(sub.image_dir)
        if not folder.is_dir():
            raise UserError("image folder not found", path=folder)
        pair_mode = bool(sub.after_dir or sub.after_suffix)
        if self.pairs and not pair_mode:
            sub_suffix = "_after"
            pair_mode = True
        else:
            sub_suffix = sub.after_suffix
        if pair_mode and not self.pairs:
            raise UserError("this subset defines pairs (after_dir/after_suffix) but the method trains on single images",
                            path=folder)
        rules = _rules(opts)
        items = []
        images = _images_in(folder, exclude_suffix=sub_suffix if pair_mode and not sub.after_dir else None)
        refs_of: dict[Path, list[Path]] = {}
        if pair_mode:  # NAME_refN next to a before image NAME is one of its control images, not an item
            images, refs_of = split_control_images(images)
        if not images:
            raise UserError(f"no images in folder (looked for {', '.join(IMAGE_EXTENSIONS)})", path=folder)
        for img in images:
            try:
                self._check_readable(img)
                caption = _caption_for(img, opts)
                after = after_caption = None
                if pair_mode:
                    after = (Path(sub.after_dir) / img.name) if sub.after_dir else img.with_name(img.stem + sub_suffix + img.suffix)
                    if not after.exists():
                        alts = [after.with_suffix(e) for e in IMAGE_EXTENSIONS if after.with_suffix(e).exists()]
                        if not alts:
                            raise UserError(f"the pair partner of {img.name} is missing (expected {after.name})", path=after)
                        after = alts[0]
                    if self._check_readable(after) != self._sizes[img]:
                        log.warning("%s: the pair's images differ in size (%s vs %s); both are resized to one bucket",
                                    img, self._sizes[img], self._sizes[after])
                    after_caption = _caption_for(after, opts) or caption
                ref_paths = reference_images(img, refs_of.get(img.with_suffix(""), []))
                for ref in ref_paths:
                    self._check_readable(ref)
                items.append(Item(path=img, caption=caption, rules=rules, is_reg=bool(opts.get("is_reg", False)),
                                  flip_aug=bool(opts.get("flip_aug", False)), after_path=after,
                                  after_caption=after_caption, dataset_index=di,
                                  instruction=read_instruction(img) if pair_mode else None, ref_paths=ref_paths))
            except UserError as e:
                if not self.job.skip_bad_images:
                    raise
                self.skipped.append(str(e))
                log.warning("skipped: %s", e)
        return items

    def _check_readable(self, path: Path) -> tuple[int, int]:
        size = load_image(path).size
        self._sizes[path] = size
        return size

    def _bucket_for(self, it: Item, buckets, enable, no_up, reso, step) -> tuple[int, int]:
        size = self._sizes[it.path]
        if not enable:
            return reso
        if no_up:
            return no_upscale_bucket(size, reso[0] * reso[1], step)
        return choose_bucket(size, buckets)

    def _hold_out(self, train_items, split: float, di: int):
        """kohya's validation_split: a share of the dataset's images (pairs), chosen with validation_seed."""
        flat = [it for items, _ in train_items for it in items]
        k = max(1, round(split * len(flat)))
        if len(flat) - k < 1:
            raise UserError(f"validation_split = {split} holds out {k} of {len(flat)} training images, leaving none "
                            "to train on; lower it or set validation_data_dir")
        seed = self.job.seed if self.job.validation_seed is None else self.job.validation_seed
        order = np.random.default_rng([seed, 211, di]).permutation(len(flat))
        held = {id(flat[i]) for i in order[:k]}
        self.validation_items += [it for it in flat if id(it) in held]
        return [([it for it in items if id(it) not in held], rep) for items, rep in train_items]

    def _validation_folder(self, ds, opts: dict, di: int, bucket_of) -> None:
        """validation_data_dir: images (or pairs, NAME + after_suffix) laid out like the first training subset."""
        sub = ds.subsets[0].model_copy(update={"image_dir": self.job.validation_data_dir, "after_dir": None,
                                               "num_repeats": 1, "is_reg": False})
        items = self._subset_items(sub, dict(opts, is_reg=False), di)
        for it in items:
            it.bucket = bucket_of(it)
            it.original_size = self._sizes[it.path]  # SDXL's validation loss runs on the trained size conditioning
        self.validation_items += items

    def _add_with_repeats(self, train_items, reg_items) -> None:
        train = [it for items, rep in train_items for _ in range(rep) for it in items]
        reg_base = [it for items, rep in reg_items for _ in range(rep) for it in items]
        self.items.extend(train)
        if reg_base:
            if len(reg_base) > len(train):
                log.warning("more regularisation images (%d) than training images (%d): some are unused",
                            len(reg_base), len(train))
            reg = [reg_base[i % len(reg_base)] for i in range(len(train))]  # round-robin up to the train count
            self.items.extend(reg)

    def pairs_without_instruction(self) -> list[Path]:
        """The instruction files (data/instructions.py) that pairs with no prompt for the edit methods lack: no
        NAME.instruction.txt, no job edit_instruction and an empty caption; trained and held-out pairs."""
        return [instruction_path(it.path) for it in self.unique_items() + self.validation_items
                if it.is_pair and not instruction_for(it.instruction, self.job.edit_instruction, it.after_caption or "")]

    # -- stats
    @property
    def num_train_images(self) -> int:
        return sum(1 for it in self.items if not it.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(1 for it in self.items if it.is_reg)

    def unique_items(self) -> list[Item]:
        seen, out = set(), []
        for it in self.items:
            if id(it) not in seen:
                seen.add(id(it))
                out.append(it)
        return out

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        freq: dict[str, dict[str, int]] = {}
        for it in self.unique_items():
            d = freq.setdefault(str(it.path.parent.name), {})
            for tag in (t.strip().lower() for t in it.caption.split(",")):
                if tag:
                    d[tag] = d.get(tag, 0) + 1
        return freq

    # -- batches
    def epoch_batches(self, epoch: int, world_size: int = 1, allowed: set[int] | None = None) -> list[list[int]]:
        """Global batches (lists of item indices) of one epoch, identical on every process.

        `allowed` limits the epoch to some unique items (by id), e.g. one pair of a per-pair stage.
        """
        key = (epoch, world_size, None if allowed is None else frozenset(allowed))
        cached = self._epoch_cache.get(key)
        if cached is not None:
            return cached
        rng = np.random.default_rng([self.job.seed, 101, epoch])
        batches: list[list[int]] = []
        by_key: dict[tuple, list[int]] = {}
        for i, it in enumerate(self.items):
            if allowed is None or id(it) in allowed:
                by_key.setdefault((it.dataset_index, it.bucket), []).append(i)
        for (di, _), idx in sorted(by_key.items()):
            size = self.batch_sizes[di] * world_size
            order = [idx[j] for j in rng.permutation(len(idx))]
            for s in range(0, len(order), size):
                chunk = order[s:s + size]
                k = 0
                while len(chunk) < size:  # complete the last batch inside the bucket
                    chunk.append(order[k % len(order)])
                    k += 1
                batches.append(chunk)
        result = [batches[j] for j in rng.permutation(len(batches))]
        if len(self._epoch_cache) > 64:
            self._epoch_cache.clear()
        self._epoch_cache[key] = result
        return result

    # -- caching
    @torch.no_grad()
    def cache_latents(self, model, cache_dir: Path | None = None, batch: int = 16, encode: bool = True,
                      measure_alignment: bool = True) -> None:
        """Encode every unique image once (a fixed VAE sample, seeded per file, as kohya caches it).

        With encode=False (cache_latents = false) only the resized pixels are kept, and
        `latent_for` encodes them at every step with a fresh VAE sample. measure_alignment=False leaves out the
        misalignment warning (most of the time a pair takes here), for a check that only refuses.
        """
        from tqdm import tqdm

        uniq = self.unique_items() + self.validation_items
        for it in tqdm(uniq, desc="caching latents" if encode else "reading images", disable=len(uniq) < 8,
                       dynamic_ncols=True):
            pixels = {key: resize_and_crop(load_image(it.image_path(key)), it.bucket) for key in it.image_keys}
            if it.is_pair:
                self._check_pair(it, pixels, measure_alignment)
            for key, img in pixels.items():
                if not encode:
                    it.pixels[key] = to_tensor(img)
                    continue
                cached = self._from_disk(cache_dir, it, key)
                if cached is None:
                    t = to_tensor(img).unsqueeze(0)
                    flips = [t, torch.flip(t, dims=[3])] if it.flip_aug else [t]
                    # Seeded by the file's content, not its path: moving a dataset does not change the LoRA.
                    source = it.image_path(key)
                    gen = torch.Generator().manual_seed(seed_of(_file_digest(source), key, self.job.seed))
                    lat = torch.cat([model.encode_images(f.to(model.device), sample=True, generator=gen).float().cpu()
                                     for f in flips])
                    cached = {key: lat[0]}
                    if it.flip_aug:
                        cached[key + "_flip"] = lat[1]
                    self._to_disk(cache_dir, it, key, cached)
                it.latents.update(cached)
            if it.is_pair:
                it.latents["pixel_diff"] = pair_difference(pixels["x"], pixels["after"])

    def sample_size(self, it: Item, flip: bool) -> SampleSize:
        """The item's size conditioning (its "before" image's, for pairs: both are cut to one bucket)."""
        return kohya_sample_size(it.original_size, it.bucket, flip)

    def latent_for(self, it: Item, key: str, flip: bool, model, generator: torch.Generator) -> torch.Tensor:
        """The (cached, or freshly encoded) latent of one image of an item."""
        if key in it.latents:
            return it.latents[key + ("_flip" if flip else "")]
        px = it.pixels[key]
        if flip:
            px = torch.flip(px, dims=[2])
        with torch.no_grad():
            return model.encode_images(px[None].to(model.device), sample=True, generator=generator).float().cpu()[0]

    def _check_pair(self, it: Item, pixels: dict, measure_alignment: bool = True) -> None:
        """Refuse two identical images; warn about a pair whose images are shifted, scaled or rotated."""
        if np.array_equal(np.asarray(pixels["x"]), np.asarray(pixels["after"])):
            raise UserError(f"the pair {it.path.name} / {it.after_path.name} is two identical images: there is no "
                            "difference to learn; fix or remove the pair", path=it.path)
        if not measure_alignment:
            return
        from .alignment import misalignment

        moved = misalignment(np.asarray(pixels["x"]), np.asarray(pixels["after"]))
        if moved:
            log.warning("%s: the pair's 'after' image is %s relative to 'before': the LoRA learns that motion as "
                        "part of the difference (difflora prep pairs --align fixes it)", it.after_path, moved)

    def _cache_name(self, cache_dir: Path, it: Item, key: str) -> Path:
        path = it.image_path(key)
        st = path.stat()
        h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{it.bucket}|{it.flip_aug}|{self.job.seed}"
                           .encode()).hexdigest()[:20]
        return cache_dir / f"{path.stem}_{key}_{h}.safetensors"

    def _from_disk(self, cache_dir, it, key):
        if cache_dir is None:
            return None
        p = self._cache_name(cache_dir, it, key)
        if p.exists():
            from ..fileio import load_safetensors

            try:
                t, _ = load_safetensors(p)
                return t
            except UserError:
                return None
        return None

    def _to_disk(self, cache_dir, it, key, tensors):
        if cache_dir is None:
            return
        from ..fileio import save_safetensors

        save_safetensors(tensors, self._cache_name(cache_dir, it, key))


def it_is_reg(sub: SubsetConfig, opts: dict) -> bool:
    return bool(opts.get("is_reg", False))


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seed_of(*parts) -> int:
    """A 63-bit seed derived from any values (the same values always give the same seed)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") % (2**63)


def pair_difference(a: Image.Image, b: Image.Image) -> torch.Tensor:
    """Per-pixel |a - b| summed over RGB (0..765), shape (H, W)."""
    da = np.asarray(a, dtype=np.int32) - np.asarray(b, dtype=np.int32)
    return torch.from_numpy(np.abs(da).sum(axis=2).astype(np.float32))


def difference_mask(pixel_diff: torch.Tensor, latent_hw: tuple[int, int], threshold: float, dilate: int) -> torch.Tensor:
    """Pixels that differ (> threshold), dilated by `dilate` px, max-pooled to latent size: (h, w) in {0, 1}."""
    import torch.nn.functional as F

    m = (pixel_diff > threshold).float()[None, None]
    if dilate > 0:
        m = F.max_pool2d(m, kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    m = F.adaptive_max_pool2d(m, latent_hw)
    return m[0, 0]
