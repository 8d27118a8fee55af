"""The bad-input corpus: every case builds its bad file(s) in a fresh workspace, at test time.

Nothing binary is committed: each case is a small function that writes its input (a truncated
PNG, a LoRA with NaN weights, a TOML with a duplicate key, ...) into a workspace and returns the
`difflora` command line that must meet it, with the expected outcome:

- "error": exit code 2 and one line on stderr, `difflora: error: <file>: <problem> (<fix>)`,
  naming `names` and containing every word in `needles`; nothing in the output folder changes.
- "ok": a documented warning-and-continue; exit code 0, every word in `log` appears in the
  log, files already in the output folder are untouched, and `check` (if any) passes.

    python tests/bad_inputs/make_corpus.py OUT_DIR [--model TINY_SD1_DIR]   # write every case to look at
    python tests/bad_inputs/make_corpus.py --readme                        # regenerate README.md's table

tests/test_bad_inputs.py runs every case through the real CLI.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

PREVIOUS = b"an earlier result that must survive"


# ---------------------------------------------------------------------------- the workspace
class Workspace:
    """root/data/2_face (4 good 16x16 faces with captions), root/out/previous.safetensors, a job."""

    def __init__(self, root: Path, model: Path):
        self.root = Path(root).resolve()
        self.model = Path(model).resolve()
        self.data = self.root / "data"
        self.images = self.data / "2_face"
        self.out = self.root / "out"
        self.images.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        for i in range(4):
            write_image(self.images / f"{i:03d}.png", _face(i))
            (self.images / f"{i:03d}.txt").write_text(f"a face, {['red', 'blue', 'green', 'black'][i]} hair",
                                                     encoding="utf-8")
        (self.out / "previous.safetensors").write_bytes(PREVIOUS)

    def job(self, extra: str = "", name: str = "job.toml", **keys) -> Path:
        """A job TOML: the base keys, overridden by `keys` (TOML literals), then `extra` lines."""
        base = {"model": _q(self.model), "train_data_dir": _q(self.data), "resolution": "16", "max_train_steps": "2",
                "network_dim": "2", "output_dir": _q(self.out), "log_with": '"none"'}
        base.update(keys)
        text = "".join(f"{k} = {v}\n" for k, v in base.items() if v is not None) + extra
        path = self.root / name
        path.write_text(text, encoding="utf-8")
        return path

    def train(self, *args, **keys) -> list:
        return ["train", self.job(**keys), *args]

    def generate(self, *args) -> list:
        return ["generate", "--model", self.model, "--prompt", "a face", "--steps", "2", "--out", self.out, *args]


def _q(path) -> str:
    return json.dumps(str(path))  # a TOML basic string


def _face(i: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    img = np.full((size, size, 3), 200, np.uint8)
    img[disc] = rng.integers(60, 250, 3)
    return img


def write_image(path: Path, arr: np.ndarray, **save) -> Path:
    Image.fromarray(arr).save(path, **save)
    return path


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_with_header(width: int, height: int) -> bytes:
    """A 100-byte PNG whose IHDR claims width x height (a decompression bomb's header)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bmp_with_header(width: int, height: int) -> bytes:
    """A BMP header (no pixel data) claiming width x height, 24 bits."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + b"\0" * 16


def gif_with_header(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    image = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + image + b"\x02\x02D\x01\x00;"


# ---------------------------------------------------------------------------- LoRA files
@functools.lru_cache(maxsize=None)
def _tiny(variant: str):
    from difflora.toy.tiny import build_tiny_sd

    return build_tiny_sd(variant, layout="small")


def lora_tensors(variant: str = "sd1", dim: int = 2):
    import torch

    from difflora.network.lora import LoRANetwork, NetworkSpec

    model = _tiny(variant)
    torch.manual_seed(0)
    net = LoRANetwork.create(model.lora_targets(), NetworkSpec(network_dim=dim, network_alpha=1.0))
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.normal_(0, 0.01)
    return net.kohya_state_dict(), model.lora_metadata()


def write_lora(path: Path, variant: str = "sd1", mutate: Callable[[dict], None] | None = None) -> Path:
    from difflora.network.files import save_lora

    import torch
    from safetensors.torch import save_file

    tensors, md = lora_tensors(variant)
    if mutate:
        mutate(tensors)
    if all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        save_lora(tensors, path, md)
    else:  # a damaged file on purpose: save_lora refuses to write one
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=md)
    return path


def raw_safetensors(path: Path, header: bytes | dict, data: bytes = b"", declared: int | None = None) -> Path:
    """A safetensors file written by hand: an 8-byte length (`declared` or the real one), header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)
    return path


def _first_module(tensors: dict) -> str:
    return sorted(k for k in tensors if k.endswith(".lora_down.weight"))[0][: -len(".lora_down.weight")]


# ---------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    what: str
    build: Callable[[Workspace], list]
    outcome: str = "error"  # or "ok"
    names: str = ""  # the file the one-line error must name
    needles: tuple[str, ...] = ()  # words the error must contain (case-insensitive)
    log: tuple[str, ...] = ()  # "ok": words that must appear in a logged warning
    check: Callable[[Workspace], None] | None = field(default=None, repr=False)


CASES: list[Case] = []


def case(name: str, what: str, outcome: str = "error", names: str = "", needles=(), log=(), check=None):
    def deco(fn):
        CASES.append(Case(name, what, fn, outcome, names, tuple(needles), tuple(log), check))
        return fn
    return deco


# ---- images ---------------------------------------------------------------
def _bad_image(ws: Workspace, name: str, data: bytes) -> list:
    (ws.images / name).write_bytes(data)
    return ws.train()


@case("truncated_png", "a PNG cut in half", names="bad.png", needles=("truncated", "re-export"))
def _(ws):
    data = _png_bytes(_face(7, 32))
    return _bad_image(ws, "bad.png", data[: len(data) // 2])


@case("truncated_jpeg", "a JPEG cut in half", names="bad.jpg", needles=("truncated", "re-export"))
def _(ws):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return _bad_image(ws, "bad.jpg", buf.getvalue()[: len(buf.getvalue()) // 2])


@case("zero_byte_image", "an empty .png file", names="empty.png", needles=("empty", "0 bytes"))
def _(ws):
    return _bad_image(ws, "empty.png", b"")


@case("text_named_png", "a text file named .png", names="notes.png", needles=("not an image",))
def _(ws):
    return _bad_image(ws, "notes.png", b"these are my notes, not a picture\n")


@case("one_pixel_image", "a 1x1 PNG", names="dot.png", needles=("1x1", "too small"))
def _(ws):
    return _bad_image(ws, "dot.png", _png_bytes(np.zeros((1, 1, 3), np.uint8)))


@case("png_bomb_header", "a 100-byte PNG whose header claims 100000x100000", names="bomb.png",
      needles=("decompression bomb",))
def _(ws):
    return _bad_image(ws, "bomb.png", png_with_header(100_000, 100_000))


@case("bmp_bomb_header", "a BMP header claiming 100000x100000", names="bomb.bmp", needles=("decompression bomb",))
def _(ws):
    return _bad_image(ws, "bomb.bmp", bmp_with_header(100_000, 100_000))


@case("gif_bomb_named_png", "a GIF claiming 65535x65535, named .png", names="bomb_gif.png",
      needles=("decompression bomb",))
def _(ws):
    return _bad_image(ws, "bomb_gif.png", gif_with_header(65535, 65535))


def _trains(ws: Workspace) -> None:
    from difflora.network.files import load_lora

    assert load_lora(ws.out / "last.safetensors").module_names()


def _mode_case(name: str, what: str, file: str, make: Callable[[Path], None],
               expected: Callable[[Path], np.ndarray], tol: float) -> None:
    """An image in another mode: it trains, and load_image gives the expected RGB pixels."""
    def build(ws):
        make(ws.images / file)
        return ws.train()

    def check(ws):
        from difflora.data.images import load_image

        _trains(ws)
        img = load_image(ws.images / file)
        assert img.mode == "RGB"
        got = np.asarray(img).astype(float)
        want = expected(ws.images / file).astype(float)
        assert got.shape == want.shape and np.abs(got - want).mean() <= tol, (name, np.abs(got - want).mean())

    CASES.append(Case(name, what, build, "ok", check=check))


_yy, _xx = np.mgrid[0:16, 0:16]
_RGB = np.dstack([_xx * 16, _yy * 16, 255 - _xx * 8 - _yy * 7]).astype(np.uint8)  # smooth: JPEG keeps it
_ALPHA = ((_xx + _yy) * 8).astype(np.uint8)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(float)[..., None] / 255.0
    return rgb.astype(float) * a + 255.0 * (1 - a)


def _palette(path: Path, **save) -> None:
    Image.fromarray(_RGB).convert("P", palette=Image.ADAPTIVE, colors=16).save(path, **save)


def _palette_on_white(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(float)
        transparent = np.asarray(im) == im.info["transparency"]
    assert 0 < transparent.sum() < transparent.size
    rgb[transparent] = 255.0
    return rgb


_mode_case("cmyk_jpeg", "a CMYK JPEG (converted to RGB)", "cmyk.jpg",
           lambda p: Image.fromarray(_RGB).convert("CMYK").save(p, quality=95), lambda p: _RGB, tol=4)
_mode_case("png_16bit", "a 16-bit greyscale PNG (scaled to 8 bits)", "grey16.png",
           lambda p: Image.fromarray(_RGB[..., 0].astype(np.uint16) * 257).save(p),
           lambda p: np.repeat(_RGB[..., :1], 3, axis=2), tol=0)
_mode_case("palette_png", "a palette (P) PNG", "palette.png", _palette,
           lambda p: np.asarray(Image.open(p).convert("RGB")), tol=0)
_mode_case("palette_png_transparency", "a palette PNG with a transparent colour (composited on white)",
           "palette_trns.png", lambda p: _palette(p, transparency=0), _palette_on_white, tol=0)
_mode_case("rgba_png", "an RGBA PNG (composited on white)", "rgba.png",
           lambda p: Image.fromarray(np.dstack([_RGB, _ALPHA])).save(p), lambda p: _on_white(_RGB, _ALPHA), tol=1)
_mode_case("grey_alpha_png", "a grey + alpha (LA) PNG (composited on white)", "la.png",
           lambda p: Image.fromarray(np.dstack([_RGB[..., 0], _ALPHA]), mode="LA").save(p),
           lambda p: np.repeat(_on_white(_RGB[..., :1], _ALPHA), 3, axis=2), tol=1)


def exif_rotated_jpeg(path: Path) -> Path:
    """Stored 32 wide x 16 high with a red left quarter, EXIF orientation 6 (rotate 90° clockwise to view)."""
    im = Image.new("RGB", (32, 16), (255, 255, 255))
    im.paste((255, 0, 0), (0, 0, 8, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif.tobytes(), quality=95)
    return path


def _check_upright(ws: Workspace) -> None:
    from difflora.data.images import load_image

    _trains(ws)
    arr = np.asarray(load_image(ws.images / "rotated.jpg")).astype(int)
    assert arr.shape == (32, 16, 3), arr.shape  # upright: 16 wide, 32 high
    assert (arr[:6, :, 0] > 200).all() and (arr[:6, :, 1] < 60).all()  # the red band is now on top
    assert (arr[12:, :, :] > 200).all()  # the rest is white


@case("exif_rotated_jpeg", "a JPEG with EXIF orientation 6: loaded upright", outcome="ok", check=_check_upright)
def _(ws):
    exif_rotated_jpeg(ws.images / "rotated.jpg")
    return ws.train()


def _check_skipped(ws: Workspace) -> None:
    from difflora.network.files import load_lora

    lora = load_lora(ws.out / "last.safetensors")
    assert lora.metadata["ss_num_skipped_images"] == "3", lora.metadata.get("ss_num_skipped_images")
    assert lora.metadata["ss_num_train_images"] == "8"  # the 4 good images x 2 repeats


@case("skip_bad_images", "three unreadable images with skip_bad_images = true: skipped and counted",
      outcome="ok", log=("skipped 3 unreadable image",), check=_check_skipped)
def _(ws):
    (ws.images / "a.png").write_bytes(b"")
    (ws.images / "b.png").write_text("text")
    (ws.images / "c.png").write_bytes(png_with_header(100_000, 100_000))
    return ws.train(skip_bad_images="true")


# ---- captions -------------------------------------------------------------
@case("caption_not_utf8", "a Latin-1 caption file", names="000.txt", needles=("not UTF-8", "re-save"))
def _(ws):
    (ws.images / "000.txt").write_bytes("caf\xe9, red hair".encode("latin-1"))
    return ws.train()


@case("caption_nul_bytes", "a caption file holding NUL bytes", names="001.txt", needles=("NUL",))
def _(ws):
    (ws.images / "001.txt").write_bytes(b"a face\x00\x00\x00")
    return ws.train()


@case("caption_too_long", "a caption of ~150 tokens (over CLIP's 77): trains, warns that the end is cut",
      outcome="ok", log=("tokens, over the text encoder's limit of 77",), check=_trains)
def _(ws):
    for txt in ws.images.glob("*.txt"):  # every caption: the two steps see two of them
        txt.write_text(", ".join(f"tag{i} word" for i in range(60)), encoding="utf-8")
    return ws.train()


# ---- data folders ---------------------------------------------------------
@case("empty_image_folder", "a <repeats>_<name> folder with no files", names="3_empty", needles=("no images",))
def _(ws):
    (ws.data / "3_empty").mkdir()
    return ws.train()


@case("only_non_image_files", "a folder holding only .txt/.json/.gif files", names="3_misc", needles=("no images",))
def _(ws):
    d = ws.data / "3_misc"
    d.mkdir()
    (d / "readme.txt").write_text("x")
    (d / "meta.json").write_text("{}")
    (d / "anim.gif").write_bytes(gif_with_header(16, 16))
    return ws.train()


@case("no_repeat_subfolders", "train_data_dir without <repeats>_<name> subfolders", names="flat",
      needles=("no data found", "10_face"))
def _(ws):
    flat = ws.root / "flat"
    flat.mkdir()
    write_image(flat / "x.png", _face(1))
    return ws.train(train_data_dir=_q(flat))


@case("pair_missing_partner", "a slider pair folder where 001 has no 001_after", names="001_after.png",
      needles=("pair partner", "missing"))
def _(ws):
    pairs = ws.root / "pairs"
    pairs.mkdir()
    for i in range(3):
        write_image(pairs / f"{i:03d}.png", _face(i))
        if i != 1:
            write_image(pairs / f"{i:03d}_after.png", _face(i + 10))
    extra = f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = {_q(pairs)}\nclass_tokens = "a face"\n'
    return ws.train(train_data_dir=None, method='"slider"', extra=extra)


# ---- job TOML -------------------------------------------------------------
@case("toml_wrong_type", "network_dim = \"four\"", names="job.toml", needles=("line 5", "network_dim", "integer"))
def _(ws):
    return ws.train(network_dim='"four"')


@case("toml_unknown_key", "a misspelt key (netwrok_alpha)", names="job.toml",
      needles=("unknown key", "netwrok_alpha", "did you mean 'network_alpha'"))
def _(ws):
    return ws.train(netwrok_alpha="4")


@case("toml_negative_steps", "max_train_steps = -5", names="job.toml",
      needles=("line 4", "max_train_steps", "greater than or equal to 1"))
def _(ws):
    return ws.train(max_train_steps="-5")


@case("toml_duplicate_key", "network_dim given twice", names="job.toml", needles=("invalid TOML", "overwrite"))
def _(ws):
    return ws.train(extra="network_dim = 8\n")


@case("toml_not_utf8", "a job TOML saved as Latin-1", names="job.toml", needles=("not UTF-8", "re-save"))
def _(ws):
    path = ws.job(training_comment='"caf\u00e9"')
    path.write_bytes(path.read_text(encoding="utf-8").encode("latin-1"))
    return ["train", path]


@case("toml_syntax_error", "an unclosed string", names="job.toml", needles=("invalid TOML", "line 8"))
def _(ws):
    return ws.train(extra='output_name = "oops\n')


@case("toml_nested_too_deeply", "an array nested 100000 deep", names="job.toml", needles=("nested too deeply",))
def _(ws):
    return ws.train(extra="optimizer_args = { x = " + "[" * 100_000 + "]" * 100_000 + " }\n")


@case("toml_nul_in_path", "a path holding a NUL character (\\u0000)", names="job.toml", needles=("NUL",))
def _(ws):
    return ws.train(output_dir='"out\\u0000put"')


@case("config_is_a_folder", "the job path is a folder", names="jobs", needles=("is a folder",))
def _(ws):
    (ws.root / "jobs").mkdir()
    return ["train", ws.root / "jobs"]


@case("config_path_escapes_dotdot", "--restrict-paths: train_data_dir = '../elsewhere' escapes the folder",
      names="job.toml", needles=("train_data_dir", "outside the allowed folder"))
def _(ws):
    served = ws.root / "served"
    served.mkdir()
    (ws.root / "elsewhere").mkdir()
    job = ws.job(name="served/job.toml", train_data_dir='"../elsewhere"', output_dir='"out"', model=None)
    return ["train", job, "--restrict-paths", served]


@case("config_path_escapes_symlink", "--restrict-paths: an image_dir symlink pointing outside the folder",
      names="job.toml", needles=("image_dir", "outside the allowed folder"))
def _(ws):
    served = ws.root / "served"
    served.mkdir()
    os.symlink(ws.images, served / "faces")
    extra = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "faces"\n'
    job = ws.job(name="served/job.toml", train_data_dir=None, output_dir='"out"', model=None, extra=extra)
    return ["train", job, "--restrict-paths", served]


@case("config_path_escapes_absolute", "--restrict-paths: an absolute output_dir outside the folder",
      names="job.toml", needles=("output_dir", "outside the allowed folder"))
def _(ws):
    served = ws.root / "served"
    (served / "data").mkdir(parents=True)
    job = ws.job(name="served/job.toml", train_data_dir='"data"', model=None)  # output_dir: ws.out, absolute
    return ["train", job, "--restrict-paths", served]


# ---- LoRA files -----------------------------------------------------------
@case("lora_truncated", "a LoRA file cut in half (inspect)", names="cut.safetensors", needles=("truncated",))
def _(ws):
    p = write_lora(ws.root / "cut.safetensors")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return ["inspect", p]


@case("lora_nan_weights", "a LoRA with a NaN in one lora_up (inspect)", names="nan.safetensors",
      needles=("NaN", "damaged"))
def _(ws):
    def poison(t):
        up = f"{_first_module(t)}.lora_up.weight"
        t[up] = t[up].clone()
        t[up][0, 0] = float("nan")
    return ["inspect", write_lora(ws.root / "nan.safetensors", mutate=poison)]


@case("lora_unknown_module", "a LoRA with a module the model does not have (generate --lora)",
      names="alien.safetensors", needles=("does not exist in this model",))
def _(ws):
    def add(t):
        t["lora_unet_no_such_block_proj.lora_down.weight"] = t[f"{_first_module(t)}.lora_down.weight"].clone()
        t["lora_unet_no_such_block_proj.lora_up.weight"] = t[f"{_first_module(t)}.lora_up.weight"].clone()
        t["lora_unet_no_such_block_proj.alpha"] = t[f"{_first_module(t)}.alpha"].clone()
    return ws.generate("--lora", write_lora(ws.root / "alien.safetensors", mutate=add))


def _alpha_zero(t):
    import torch

    for k in t:
        if k.endswith(".alpha"):
            t[k] = torch.tensor(0.0)


@case("lora_alpha_zero", "a LoRA whose alphas are 0: treated as alpha = rank, with a warning (inspect)",
      outcome="ok", log=("60 module(s)", "have alpha 0; using alpha = rank"))
def _(ws):
    return ["inspect", write_lora(ws.root / "alpha0.safetensors", mutate=_alpha_zero)]


@case("lora_header_length_absurd", "a safetensors whose 8-byte header length says 2^60", names="huge.safetensors",
      needles=("declared header of 1152921504606846976 bytes", "truncated or another format"))
def _(ws):
    return ["inspect", raw_safetensors(ws.root / "huge.safetensors", {"__metadata__": {}}, declared=2**60)]


@case("lora_tensor_offsets_absurd", "a tensor whose data_offsets end at 2^60", names="offsets.safetensors",
      needles=("lies outside the file",))
def _(ws):
    header = {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 2**60]}}
    return ["inspect", raw_safetensors(ws.root / "offsets.safetensors", header, b"\0" * 16)]


@case("lora_header_nested", "a header of 100000 nested JSON arrays", names="nested.safetensors",
      needles=("nested too deeply",))
def _(ws):
    return ["inspect", raw_safetensors(ws.root / "nested.safetensors", b"[" * 100_000 + b"]" * 100_000)]


@case("lora_bad_shapes", "a LoRA whose lora_up is 1-D", names="shapes.safetensors", needles=("inconsistent shapes",))
def _(ws):
    def flatten(t):
        up = f"{_first_module(t)}.lora_up.weight"
        t[up] = t[up].flatten().contiguous()
    return ["inspect", write_lora(ws.root / "shapes.safetensors", mutate=flatten)]


@case("lora_for_sd2_on_sd1", "an SD2 LoRA given to an SD1 model (generate --lora)", names="sd2.safetensors",
      needles=("sd_v2", "the model is sd_v1"))
def _(ws):
    return ws.generate("--lora", write_lora(ws.root / "sd2.safetensors", variant="sd2"))


@case("lora_pickle_pt", "a LoRA as a pickle .pt file (inspect)", names="old.pt", needles=("pickle", "safetensors"))
def _(ws):
    import torch

    torch.save(lora_tensors()[0], ws.root / "old.pt")
    return ["inspect", ws.root / "old.pt"]


@case("network_weights_pickle", "network_weights = a .pt file", names="init.pt", needles=("pickle",))
def _(ws):
    import torch

    torch.save(lora_tensors()[0], ws.root / "init.pt")
    return ws.train(network_weights=_q(ws.root / "init.pt"))


@case("preset_lora_pickle", "a preset LoRA that is a .ckpt file", names="preset.ckpt", needles=("pickle",))
def _(ws):
    import torch

    torch.save(lora_tensors()[0], ws.root / "preset.ckpt")
    return ws.train(extra=f"[[preset_loras]]\npath = {_q(ws.root / 'preset.ckpt')}\n")


@case("network_weights_truncated", "network_weights = a truncated LoRA", names="init.safetensors",
      needles=("truncated",))
def _(ws):
    p = write_lora(ws.root / "init.safetensors")
    p.write_bytes(p.read_bytes()[:-100])
    return ws.train(network_weights=_q(p))


# ---- models ---------------------------------------------------------------
@case("model_missing_component", "a diffusers folder without vae/", names="broken_model",
      needles=("missing its vae/ component",))
def _(ws):
    broken = ws.root / "broken_model"
    shutil.copytree(ws.model, broken)
    shutil.rmtree(broken / "vae")
    return ws.train(model=_q(broken))


@case("model_ckpt_without_allow_pickle", "model = a .ckpt file, no --allow-pickle / allow_pickle",
      names="model.ckpt", needles=("pickle", "--allow-pickle"))
def _(ws):
    import torch

    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, ws.root / "model.ckpt")
    return ws.train(model=_q(ws.root / "model.ckpt"))


@case("model_sdxl_single_file", "an SDXL-looking single-file checkpoint (generate --model)", names="xl.safetensors",
      needles=("SDXL",))
def _(ws):
    import torch
    from safetensors.torch import save_file

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4),
               "model.diffusion_model.out.2.weight": torch.zeros(4, 4, 1, 1)}, str(ws.root / "xl.safetensors"))
    args = ws.generate()
    args[args.index("--model") + 1] = ws.root / "xl.safetensors"
    return args


@case("model_not_found", "model = a path that does not exist", names="no_such_model", needles=("not found",))
def _(ws):
    return ws.train(model=_q(ws.root / "no_such_model"))


@case("model_is_a_lora", "model = a LoRA file", names="as_model.safetensors", needles=("LoRA file, not a model",))
def _(ws):
    return ws.train(model=_q(write_lora(ws.root / "as_model.safetensors")))


# ---- runs -----------------------------------------------------------------
@case("resume_without_state", "--resume with no saved state", names="last-state", needles=("state", "missing"))
def _(ws):
    return ws.train("--resume")


@case("output_exists", "the output LoRA exists and overwrite is false", names="last.safetensors",
      needles=("already exists", "--resume"))
def _(ws):
    (ws.out / "last.safetensors").write_bytes(b"an earlier LoRA")
    return ws.train()


# ---- command-line values that nothing can use -------------------------------
@case("gen_steps_zero", "generate --steps 0", names="--steps", needles=("at least 1", "got 0"))
def _(ws):
    return ws.generate("--steps", "0")


@case("gen_n_images_zero", "generate --n-images 0 (would write nothing, exit 0)", names="--n-images",
      needles=("at least 1",))
def _(ws):
    return ws.generate("--n-images", "0")


@case("gen_width_not_multiple_of_8", "generate --width 20", names="--width", needles=("multiple of 8", "got 20"))
def _(ws):
    return ws.generate("--width", "20")


@case("gen_height_negative", "generate --height -16", names="--height", needles=("multiple of 8", "got -16"))
def _(ws):
    return ws.generate("--height=-16")


@case("gen_sweep_nan", "generate --sweep nan,1", names="--sweep", needles=("finite", "nan"))
def _(ws):
    return ws.generate("--lora", write_lora(ws.root / "l.safetensors"), "--sweep", "nan,1")


@case("gen_sweep_inf", "generate --sweep -1,inf", names="--sweep", needles=("finite", "inf"))
def _(ws):
    return ws.generate("--lora", write_lora(ws.root / "l.safetensors"), "--sweep", "-1,inf")


@case("gen_lora_multiplier_nan", "generate --lora FILE:nan", names="l.safetensors", needles=("multiplier", "finite"))
def _(ws):
    return ws.generate("--lora", f"{write_lora(ws.root / 'l.safetensors')}:nan")


@case("gen_cfg_nan", "generate --cfg nan", names="--cfg", needles=("finite",))
def _(ws):
    return ws.generate("--cfg", "nan")


@case("gen_seed_negative", "generate --seed -1", names="--seed", needles=("between 0 and",))
def _(ws):
    return ws.generate("--seed=-1")


@case("gen_clip_skip_beyond_layers", "generate --clip-skip 50 on a 2-layer text encoder", names="--clip-skip",
      needles=("beyond the 2 layers", "use 1 to 2"))
def _(ws):
    return ws.generate("--clip-skip", "50")


@case("gen_clip_skip_zero", "generate --clip-skip 0 (would pick the embeddings)", names="--clip-skip",
      needles=("at least 1",))
def _(ws):
    return ws.generate("--clip-skip", "0")


@case("gen_unknown_sampler", "generate --sampler eular (misspelt)", names="--sampler", needles=("unknown sampler", "euler"))
def _(ws):
    return ws.generate("--sampler", "eular")


@case("extract_min_diff_nan", "extract --min-diff nan", names="--min-diff", needles=("finite",))
def _(ws):
    return ["extract", "--model-org", ws.model, "--model-tuned", ws.model, "--min-diff", "nan",
            "--save-to", ws.out / "x.safetensors"]


@case("merge_ratio_inf", "merge --ratios inf", names="ratio", needles=("finite",))
def _(ws):
    return ["merge", "--models", write_lora(ws.root / "l.safetensors"), "--ratios", "inf",
            "--save-to", ws.out / "m.safetensors"]


@case("merge_shuffle_seed_negative", "merge --shuffle --seed -5", names="--seed", needles=("between 0 and",))
def _(ws):
    return ["merge", "--models", write_lora(ws.root / "l.safetensors"), "--shuffle", "--seed=-5",
            "--save-to", ws.out / "m.safetensors"]


@case("resize_param_nan", "resize --dynamic sv_fro --param nan", names="--param", needles=("sv_fro",))
def _(ws):
    return ["resize", "--model", write_lora(ws.root / "l.safetensors"), "--dynamic", "sv_fro", "--param", "nan",
            "--save-to", ws.out / "r.safetensors"]


@case("eval_pairs_zero", "eval --pairs 0", names="--pairs", needles=("at least 1",))
def _(ws):
    return ["eval", "--pairs", "0", "--out", ws.out / "eval"]


@case("eval_m_zero", "eval --m 0 (would train, then score nothing)", names="--m", needles=("at least 1",))
def _(ws):
    return ["eval", "--m", "0", "--out", ws.out / "eval"]


@case("toy_train_base_no_images", "toy train-base --n-images 0", names="--n-images", needles=("at least 1",))
def _(ws):
    return ["toy", "train-base", "--n-images", "0", "--out", ws.out / "base", "--work", ws.out / "work"]


@case("cli_bad_int", "generate --steps ten (argparse, in the house style)", names="--steps",
      needles=("invalid int value", "--help"))
def _(ws):
    return ws.generate("--steps", "ten")


# ---- prompt files: checked before the model is loaded -----------------------
def _prompts(ws: Workspace, text: str, name: str = "prompts.txt") -> list:
    (ws.root / name).write_text(text, encoding="utf-8")
    return ["generate", "--model", ws.model, "--from-file", ws.root / name, "--out", ws.out]


@case("prompts_size_not_multiple_of_8", "a prompt file line with --w 20", names="prompts.txt",
      needles=("prompt 2", "width", "multiple of 8"))
def _(ws):
    return _prompts(ws, "a face --s 2\na face --w 20 --h 16 --s 2\n")


@case("prompts_unknown_sampler", "a prompt file line with --ss eular", names="prompts.txt",
      needles=("prompt 1", "unknown sampler 'eular'"))
def _(ws):
    return _prompts(ws, "a face --ss eular --s 2\n")


@case("prompts_scale_nan", "a prompt file line with --l nan", names="prompts.txt", needles=("guidance scale", "finite"))
def _(ws):
    return _prompts(ws, "a face --l nan --s 2\n")


@case("prompts_seed_negative", "a prompt file line with --d -3", names="prompts.txt", needles=("seed", "between 0"))
def _(ws):
    return _prompts(ws, "a face --d -3 --s 2\n")


@case("prompts_json_scale_text", "a JSON prompt whose scale is a string", names="prompts.json",
      needles=("entry 1", "scale", "a number"))
def _(ws):
    return _prompts(ws, '[{"prompt": "a face", "scale": "high"}]', "prompts.json")


@case("prompts_json_not_a_list", "a JSON prompt file holding an object", names="prompts.json", needles=("list",))
def _(ws):
    return _prompts(ws, '{"prompt": "a face"}', "prompts.json")


@case("prompts_file_is_a_folder", "--from-file names a folder", names="pfolder", needles=("is a folder",))
def _(ws):
    (ws.root / "pfolder").mkdir()
    return ["generate", "--model", ws.model, "--from-file", ws.root / "pfolder", "--out", ws.out]


# ---- paths -------------------------------------------------------------------
@case("gen_out_is_a_file", "generate --out an existing file", names="previous.safetensors",
      needles=("existing file", "not a folder"))
def _(ws):
    args = ws.generate()
    args[args.index("--out") + 1] = ws.out / "previous.safetensors"
    return args


@case("gen_out_unwritable", "generate --out under a folder that cannot be written (/proc)", names="/proc",
      needles=("cannot write",))
def _(ws):
    args = ws.generate()
    args[args.index("--out") + 1] = "/proc/difflora-out"
    return args


@case("gen_out_name_too_long", "generate --out with a 300-byte folder name", names="--out",
      needles=("longer than the file system allows",))
def _(ws):
    args = ws.generate()
    args[args.index("--out") + 1] = ws.out / ("x" * 300)
    return args


@case("merge_save_to_name_too_long", "merge --save-to with a 300-byte file name", names="--save-to",
      needles=("longer than the file system allows",))
def _(ws):
    return ["merge", "--models", write_lora(ws.root / "l.safetensors"),
            "--save-to", ws.out / ("m" * 290 + ".safetensors")]


@case("merge_save_to_under_a_file", "merge --save-to FILE/x.safetensors (a file where a folder should be)",
      names="previous.safetensors", needles=("existing file",))
def _(ws):
    return ["merge", "--models", write_lora(ws.root / "l.safetensors"),
            "--save-to", ws.out / "previous.safetensors" / "x.safetensors"]


@case("svd_merge_save_to_a_folder", "svd-merge --save-to an existing folder", names="out", needles=("is a folder",))
def _(ws):
    return ["svd-merge", "--models", write_lora(ws.root / "l.safetensors"), "--save-to", ws.out]


@case("judge_symlink_loop", "toy judge on a symlink loop", names="loop_a", needles=("symlink loop",))
def _(ws):
    os.symlink(ws.root / "loop_b", ws.root / "loop_a")
    os.symlink(ws.root / "loop_a", ws.root / "loop_b")
    return ["toy", "judge", ws.root / "loop_a", "--json", ws.out / "j.json"]


@case("judge_json_is_a_folder", "toy judge --json an existing folder", names="out", needles=("is a folder",))
def _(ws):
    return ["toy", "judge", ws.images, "--json", ws.out]


# ---- a command never writes over its own inputs -------------------------------
@case("merge_save_to_its_input", "merge --save-to one of its own --models", names="own.safetensors",
      needles=("would overwrite the input",))
def _(ws):
    own = write_lora(ws.out / "own.safetensors")
    return ["merge", "--models", own, write_lora(ws.root / "l.safetensors"), "--save-to", own]


@case("merge_save_to_input_via_symlink", "merge --save-to a symlink to one of its inputs", names="alias.safetensors",
      needles=("would overwrite the input",))
def _(ws):
    own = write_lora(ws.out / "own.safetensors")
    os.symlink(own, ws.root / "alias.safetensors")
    return ["merge", "--models", own, "--save-to", ws.root / "alias.safetensors"]


@case("svd_merge_save_to_its_input", "svd-merge --save-to one of its own --models", names="own.safetensors",
      needles=("would overwrite the input",))
def _(ws):
    own = write_lora(ws.out / "own.safetensors")
    return ["svd-merge", "--models", own, "--new-rank", "1", "--save-to", own]


@case("resize_onto_its_input", "resize --save-to its own --model", names="own.safetensors",
      needles=("would overwrite the input",))
def _(ws):
    own = write_lora(ws.out / "own.safetensors")
    return ["resize", "--model", own, "--new-rank", "1", "--save-to", own]


@case("extract_into_the_model_folder", "extract --save-to a file inside --model-tuned's folder", names="unet",
      needles=("would overwrite the input",))
def _(ws):
    return ["extract", "--model-org", ws.model, "--model-tuned", ws.model,
            "--save-to", ws.model / "unet" / "diffusion_pytorch_model.safetensors"]


@case("gen_out_over_its_prompt_file", "generate writing 000_0.png over its own --from-file", names="000_0.png",
      needles=("would overwrite the input",))
def _(ws):
    (ws.out / "000_0.png").write_text("a face --s 2\n", encoding="utf-8")
    return ["generate", "--model", ws.model, "--from-file", ws.out / "000_0.png", "--seed", "0", "--out", ws.out]


# ---- numbers that overflow -------------------------------------------------------
def _huge_factors(t):
    import torch

    m = _first_module(t)
    t[f"{m}.lora_up.weight"] = torch.full_like(t[f"{m}.lora_up.weight"], 1e20)
    t[f"{m}.lora_down.weight"] = torch.full_like(t[f"{m}.lora_down.weight"], 1e20)


def _huge_alpha(t):
    import torch

    for k in t:
        if k.endswith(".alpha"):
            t[k] = torch.tensor(1e37)


@case("merge_fp16_overflow", "merge --ratios 1e30 --save-precision fp16: the result does not fit fp16",
      names="m.safetensors", needles=("overflows to inf", "float16", "nothing was written"))
def _(ws):
    return ["merge", "--models", write_lora(ws.root / "l.safetensors"), "--ratios", "1e30",
            "--save-precision", "fp16", "--save-to", ws.out / "m.safetensors"]


@case("svd_merge_fp16_overflow", "svd-merge --ratios 1e30 --save-precision fp16", names="m.safetensors",
      needles=("overflows to inf", "float16", "module lora_"))
def _(ws):
    return ["svd-merge", "--models", write_lora(ws.root / "l.safetensors"), "--ratios", "1e30",
            "--save-precision", "fp16", "--save-to", ws.out / "m.safetensors"]


@case("resize_fp16_overflow", "resize a LoRA with factors of 1e20 to fp16", names="r.safetensors",
      needles=("overflows to inf", "float16", "module lora_"))
def _(ws):
    return ["resize", "--model", write_lora(ws.root / "l.safetensors", mutate=_huge_factors), "--new-rank", "1",
            "--save-precision", "fp16", "--save-to", ws.out / "r.safetensors"]


@case("merge_into_model_fp16_overflow", "merge into a model with --ratios 1e30 --save-precision fp16",
      names="merged", needles=("overflows to inf", "float16", "module lora_"))
def _(ws):
    return ["merge", "--model", ws.model, "--models", write_lora(ws.root / "l.safetensors"), "--ratios", "1e30",
            "--save-precision", "fp16", "--save-to", ws.out / "merged"]


@case("merge_float32_overflow", "merge --ratios 1e38 1e38 (the sum overflows float32)", names="m.safetensors",
      needles=("would hold", "module lora_"))
def _(ws):
    def big(t):
        for k in t:
            if k.endswith(".weight"):
                t[k] = t[k].sign() * 1e10 + 1e10
    lora = write_lora(ws.root / "l.safetensors", mutate=big)
    return ["merge", "--models", lora, lora, "--ratios", "1e38", "1e38", "--save-to", ws.out / "m.safetensors"]


@case("gen_lora_factors_overflow", "a LoRA with finite factors of 1e20 whose product overflows (generate)",
      names="huge.safetensors", needles=("NaN/inf", "would be black", "overflows float32", "lora_"))
def _(ws):
    return ws.generate("--lora", write_lora(ws.root / "huge.safetensors", mutate=_huge_factors))


@case("gen_lora_alpha_overflow", "a LoRA whose alpha of 1e37 makes the image non-finite (generate)",
      names="alpha.safetensors", needles=("NaN/inf", "would be black", "largest change is LoRA module"))
def _(ws):
    return ws.generate("--lora", write_lora(ws.root / "alpha.safetensors", mutate=_huge_alpha))


# ---- job values the schema takes but nothing can use (checked before the model is loaded) ----
@case("job_seed_negative", "seed = -1", names="job.toml", needles=("line 8", "seed", "between 0 and"))
def _(ws):
    return ws.train(seed="-1")


@case("job_after_suffix_with_separator", "after_suffix with a path separator", names="job.toml",
      needles=("after_suffix", "path separator"))
def _(ws):
    return ws.train(train_data_dir=None, extra=f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = {_q(ws.images)}\n"
                                                 'after_suffix = "/../closed"\n')


@case("job_caption_extension_with_separator", "caption_extension with a path separator", names="job.toml",
      needles=("caption_extension", "path separator"))
def _(ws):
    return ws.train(caption_extension='"../x.txt"')


@case("job_resolution_negative", "resolution = -16", names="job.toml", needles=("line 3", "resolution", "multiple of 8"))
def _(ws):
    return ws.train(resolution="-16")


@case("job_resolution_not_multiple_of_8", "resolution = 20", names="job.toml",
      needles=("line 3", "resolution", "got 20"))
def _(ws):
    return ws.train(resolution="20")


@case("job_alpha_nan", "network_alpha = nan", names="job.toml", needles=("line 8", "network_alpha", "finite"))
def _(ws):
    return ws.train(network_alpha="nan")


@case("job_learning_rate_inf", "learning_rate = inf", names="job.toml", needles=("learning_rate", "finite", "inf"))
def _(ws):
    return ws.train(learning_rate="inf")


@case("job_unet_lr_inf", "unet_lr = inf", names="job.toml", needles=("unet_lr", "finite"))
def _(ws):
    return ws.train(unet_lr="inf")


@case("job_optimizer_eps_negative", "optimizer_args = { eps = -1 }", names="job.toml",
      needles=("optimizer_args", "epsilon"))
def _(ws):
    return ws.train(optimizer_args="{ eps = -1 }")


@case("job_optimizer_betas_out_of_range", "optimizer_args = { betas = [2.0, 0.5] }", names="job.toml",
      needles=("optimizer_args", "beta"))
def _(ws):
    return ws.train(optimizer_args="{ betas = [2.0, 0.5] }")


@case("job_optimizer_unknown_arg", "optimizer_args = { momentun = 0.9 } for AdamW", names="job.toml",
      needles=("optimizer_args", "momentun"))
def _(ws):
    return ws.train(optimizer_args="{ momentun = 0.9 }")


@case("job_network_dim_huge", "network_dim = 10^12", names="job.toml", needles=("line 5", "network_dim", "larger than"))
def _(ws):
    return ws.train(network_dim="1000000000000")


@case("job_warmup_inf", "lr_warmup_steps = inf", names="job.toml", needles=("lr_warmup_steps", "finite"))
def _(ws):
    return ws.train(lr_warmup_steps="inf")


@case("job_noise_offset_inf", "noise_offset = inf", names="job.toml", needles=("noise_offset", "finite"))
def _(ws):
    return ws.train(noise_offset="inf")


@case("job_clip_skip_beyond_layers", "clip_skip = 12 on a 2-layer text encoder", names="job.toml",
      needles=("clip_skip", "beyond the 2 layers"))
def _(ws):
    return ws.train(clip_skip="12")


# ---- found before the first step, not after training -----------------------------------
@case("job_sample_sampler_misspelt", "sample_sampler = 'eular' with sample prompts", names="job.toml",
      needles=("sample_sampler", "unknown sampler 'eular'"))
def _(ws):
    (ws.root / "prompts.txt").write_text("a face\n", encoding="utf-8")
    return ws.train(sample_sampler='"eular"', sample_prompts=_q(ws.root / "prompts.txt"), sample_every_n_steps="1")


@case("job_sample_prompt_bad_size", "a sample prompt with --w 20", names="prompts.txt",
      needles=("prompt 1", "width", "multiple of 8"))
def _(ws):
    (ws.root / "prompts.txt").write_text("a face --w 20 --h 16\n", encoding="utf-8")
    return ws.train(sample_prompts=_q(ws.root / "prompts.txt"), sample_every_n_steps="1")


@case("job_sample_prompt_unknown_sampler", "a sample prompt with --ss nosuch", names="prompts.txt",
      needles=("unknown sampler 'nosuch'",))
def _(ws):
    (ws.root / "prompts.txt").write_text("a face --ss nosuch\n", encoding="utf-8")
    return ws.train(sample_prompts=_q(ws.root / "prompts.txt"), sample_every_n_steps="1")


@case("job_sample_prompts_missing", "sample_prompts names a file that does not exist", names="nope.txt",
      needles=("prompt file not found",))
def _(ws):
    return ws.train(sample_prompts=_q(ws.root / "nope.txt"), sample_every_n_steps="1")


# ---- job paths ------------------------------------------------------------------------------
@case("job_output_dir_is_a_file", "output_dir = an existing file", names="job.toml",
      needles=("line 6", "output_dir", "existing file"))
def _(ws):
    return ws.train(output_dir=_q(ws.out / "previous.safetensors"))


@case("job_output_dir_unwritable", "output_dir under /proc (cannot be written)", names="job.toml",
      needles=("output_dir", "cannot write"))
def _(ws):
    return ws.train(output_dir='"/proc/difflora-out"')


@case("job_logging_dir_is_a_file", "logging_dir = an existing file, log_with = tensorboard", names="job.toml",
      needles=("logging_dir", "existing file"))
def _(ws):
    return ws.train(log_with='"tensorboard"', logging_dir=_q(ws.out / "previous.safetensors"))


@case("job_data_symlink_loop", "train_data_dir is a symlink loop", names="job.toml",
      needles=("train_data_dir", "symlink loop"))
def _(ws):
    os.symlink(ws.root / "loop_b", ws.root / "loop_a")
    os.symlink(ws.root / "loop_a", ws.root / "loop_b")
    return ws.train(train_data_dir=_q(ws.root / "loop_a"))


@case("job_output_name_too_long", "output_name of 240 characters", names="job.toml",
      needles=("output_name", "200 bytes"))
def _(ws):
    return ws.train(output_name=_q("n" * 240))


# ---- resume against a changed job or a damaged state -------------------------------------------
def _state(ws: Workspace, shapes: dict | None = None, drop: str | None = None, extra_ref: str | None = None) -> None:
    """A training state in out/last-state as a run saves it (hand-made: the tests need no training)."""
    import torch

    from difflora.statefile import save_state

    state = {"stage_index": 0, "stage_name": "main", "step": 1, "network": {"w": torch.zeros(2)},
             "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "completed": {},
             "fingerprint": "x", "session_id": 1, "started": 0.0, "params": "current"}
    if shapes is not None:
        state["shapes"] = shapes
    if drop:
        del state[drop]
    save_state(ws.out / "last-state", state)
    if extra_ref:
        index = ws.out / "last-state" / "state.json"
        meta = json.loads(index.read_text())
        meta["tree"]["network"]["extra"] = {"__tensor__": extra_ref}
        index.write_text(json.dumps(meta))


_SHAPES = {"method": "standard", "network_dim": 2, "conv_dim": None, "network_train_unet_only": False,
           "network_train_text_encoder_only": False, "network_only_if_contains": [], "network_ignore_if_contains": [],
           "per_pair_average": False, "optimizer_type": "AdamW"}


@case("resume_changed_network_dim", "--resume with network_dim 8 from a state made with 2", names="last-state",
      needles=("cannot resume", "network_dim = 2 there, 8 in this job"))
def _(ws):
    _state(ws, _SHAPES)
    return ws.train("--resume", network_dim="8")


@case("resume_changed_method", "--resume with method copier from a standard run's state", names="last-state",
      needles=("cannot resume", "method = 'standard' there, 'copier' in this job"))
def _(ws):
    _state(ws, _SHAPES)
    pairs = ws.root / "pairs"
    pairs.mkdir()
    for i in range(2):
        write_image(pairs / f"{i:03d}.png", _face(i))
        write_image(pairs / f"{i:03d}_after.png", _face(i + 10))
    return ws.train("--resume", method='"copier"', train_data_dir=_q(pairs))


@case("resume_changed_optimizer", "--resume with optimizer_type SGD from an AdamW state", names="last-state",
      needles=("cannot resume", "optimizer_type = 'AdamW' there, 'SGD'"))
def _(ws):
    _state(ws, _SHAPES)
    return ws.train("--resume", optimizer_type='"SGD"')


@case("resume_old_state_wrong_shapes", "--resume from a state (without recorded settings) whose tensors do not fit",
      names="last-state", needles=("cannot resume", "does not fit this job's LoRA"))
def _(ws):
    _state(ws)
    return ws.train("--resume")


@case("resume_state_missing_tensor", "--resume from a state.json that points at a tensor the file lacks",
      names="last-state", needles=("damaged", "s.network.gone", "does not hold"))
def _(ws):
    _state(ws, _SHAPES, extra_ref="s.network.gone")
    return ws.train("--resume")


@case("resume_state_missing_part", "--resume from a state without its optimizer part", names="last-state",
      needles=("damaged", "has no optimizer"))
def _(ws):
    _state(ws, _SHAPES, drop="optimizer")
    return ws.train("--resume")


# ---------------------------------------------------------------------------- issue 33: nothing read is written
def _prep_data(ws: Workspace) -> Path:
    """root/prep: two pairs and a single image (24 px), each with a caption."""
    d = ws.root / "prep"
    d.mkdir(exist_ok=True)
    for i, name in enumerate(("a", "a_after", "b", "b_after", "c")):
        write_image(d / f"{name}.png", _face(i, 24))
        (d / f"{name}.txt").write_text(f"a face, {name}", encoding="utf-8")
    return d


@case("prep_tag_caption_ext_png", "prep tag --caption-extension .png --overwrite (captions over the images)",
      names="--caption-extension", needles=("image extension",))
def _(ws):
    return ["prep", "tag", _prep_data(ws), "--tagger", "toy", "--caption-extension", ".png", "--overwrite"]


@case("prep_tag_caption_ext_jpg_upper", "prep tag --caption-extension JPG (an image extension in capitals)",
      names="--caption-extension", needles=("image extension",))
def _(ws):
    return ["prep", "tag", _prep_data(ws), "--tagger", "toy", "--caption-extension", "JPG", "--append"]


@case("prep_tag_caption_ext_with_separator", "prep tag --caption-extension '/../x.txt'", names="--caption-extension",
      needles=("path separator",))
def _(ws):
    return ["prep", "tag", _prep_data(ws), "--tagger", "toy", "--caption-extension", "/../x.txt"]


@case("prep_tag_two_images_one_caption", "prep tag: face.png and face.jpg would write one face.txt",
      names="face.txt", needles=("face.jpg", "face.png", "both be written"))
def _(ws):
    d = ws.root / "two"
    d.mkdir()
    write_image(d / "face.png", _face(1, 24))
    write_image(d / "face.jpg", _face(2, 24))
    return ["prep", "tag", d, "--tagger", "toy"]


@case("prep_tag_bad_image_after_good_ones", "prep tag: a truncated image after five good ones (no caption written)",
      names="005.png", needles=("truncated",))
def _(ws):
    d = ws.root / "seven"
    d.mkdir()
    for i in range(7):
        write_image(d / f"{i:03d}.png", _face(i, 24))
    (d / "005.png").write_bytes((d / "005.png").read_bytes()[:60])
    return ["prep", "tag", d, "--tagger", "toy", "--batch-size", "2"]


def _prep_tag_option(name: str, what: str, flag: str, value: str, needle: str) -> None:
    def build(ws):
        return ["prep", "tag", _prep_data(ws), "--tagger", "toy", flag, value]

    CASES.append(Case(name, what, build, "error", flag, (needle,)))


_prep_tag_option("prep_tag_threshold_nan", "prep tag --threshold nan (would tag everything)", "--threshold", "nan",
                 "between 0 and 1")
_prep_tag_option("prep_tag_threshold_above_one", "prep tag --threshold 1.5", "--threshold", "1.5", "between 0 and 1")
_prep_tag_option("prep_tag_character_threshold_negative", "prep tag --character-threshold -0.2",
                 "--character-threshold", "-0.2", "between 0 and 1")
_prep_tag_option("prep_tag_batch_size_zero", "prep tag --batch-size 0", "--batch-size", "0", "at least 1")


@case("prep_tag_tagger_folder_without_model", "prep tag --tagger an empty folder", names="empty_tagger",
      needles=("not a tagger folder",))
def _(ws):
    (ws.root / "empty_tagger").mkdir()
    return ["prep", "tag", _prep_data(ws), "--tagger", ws.root / "empty_tagger"]


@case("prep_tag_wd14_tags_csv_missing", "a WD14 folder with model.onnx but no selected_tags.csv",
      names="selected_tags.csv", needles=("tags file not found",))
def _(ws):
    (ws.root / "wd14").mkdir()
    (ws.root / "wd14" / "model.onnx").write_bytes(b"not onnx")
    return ["prep", "tag", _prep_data(ws), "--tagger", ws.root / "wd14"]


@case("prep_tag_wd14_tags_csv_bad_header", "a WD14 tags CSV without name/category columns", names="selected_tags.csv",
      needles=("not a WD14 tags file",))
def _(ws):
    (ws.root / "wd14").mkdir()
    (ws.root / "wd14" / "model.onnx").write_bytes(b"not onnx")
    (ws.root / "wd14" / "selected_tags.csv").write_text("id,label\n1,cat\n", encoding="utf-8")
    return ["prep", "tag", _prep_data(ws), "--tagger", ws.root / "wd14"]


@case("prep_tag_wd14_model_not_onnx", "a WD14 folder whose model.onnx is not an ONNX model", names="model.onnx",
      needles=("cannot load the ONNX model",))
def _(ws):
    (ws.root / "wd14").mkdir()
    (ws.root / "wd14" / "model.onnx").write_bytes(b"not onnx at all")
    (ws.root / "wd14" / "selected_tags.csv").write_text("tag_id,name,category,count\n1,cat,0,5\n", encoding="utf-8")
    return ["prep", "tag", _prep_data(ws), "--tagger", ws.root / "wd14"]


@case("prep_tag_captioner_config_broken", "a captioner folder whose config.json is not JSON", names="captioner",
      needles=("cannot load an image-captioning model",))
def _(ws):
    (ws.root / "captioner").mkdir()
    (ws.root / "captioner" / "config.json").write_text("{ not json", encoding="utf-8")
    return ["prep", "tag", _prep_data(ws), "--tagger", ws.root / "captioner"]


@case("prep_pairs_json_is_an_input_image", "prep pairs --json naming one of its input images", names="a.png",
      needles=("would overwrite the input",))
def _(ws):
    d = _prep_data(ws)
    return ["prep", "pairs", d, "--json", d / "a.png"]


@case("prep_pairs_json_is_a_caption", "prep pairs --json naming a caption file of the folder", names="b.txt",
      needles=("would overwrite the input",))
def _(ws):
    d = _prep_data(ws)
    return ["prep", "pairs", d, "--json", d / "b.txt"]


@case("prep_pairs_json_symlink_to_an_input", "prep pairs --json: a symlink to an input image", names="report.json",
      needles=("would overwrite the input",))
def _(ws):
    d = _prep_data(ws)
    (ws.root / "report.json").symlink_to(d / "a_after.png")
    return ["prep", "pairs", d, "--json", ws.root / "report.json"]


@case("prep_pairs_json_case_variant", "prep pairs --json A.PNG beside a.png (one file on case-insensitive disks)",
      names="A.PNG", needles=("would overwrite the input",))
def _(ws):
    d = _prep_data(ws)
    return ["prep", "pairs", d, "--json", d / "A.PNG"]


@case("prep_pairs_align_report_over_an_aligned_image", "prep pairs --align --json OUT/a_after.png",
      names="a_after.png", needles=("both be written",))
def _(ws):
    return ["prep", "pairs", _prep_data(ws), "--align", "--out", ws.root / "aligned",
            "--json", ws.root / "aligned" / "a_after.png"]


@case("prep_pairs_align_without_out", "prep pairs --align without --out", names="--align", needles=("--out OUT",))
def _(ws):
    return ["prep", "pairs", _prep_data(ws), "--align"]


@case("prep_pairs_no_pairs", "prep pairs on a folder of single images", names="singles", needles=("no pairs",))
def _(ws):
    d = ws.root / "singles"
    d.mkdir()
    write_image(d / "x.png", _face(3, 24))
    return ["prep", "pairs", d]


@case("prep_captions_report_is_an_input_image", "prep captions --report naming an image of the folder", names="c.png",
      needles=("would overwrite the input",))
def _(ws):
    d = _prep_data(ws)
    return ["prep", "captions", d, "--trigger", "zkw", "--report", d / "c.png"]


@case("prep_captions_report_hard_link", "prep captions --report: a hard link to an input image", names="hard.json",
      needles=("would overwrite the input",))
def _(ws):
    d = _prep_data(ws)
    os.link(d / "b.png", ws.root / "hard.json")
    return ["prep", "captions", d, "--trigger", "zkw", "--report", ws.root / "hard.json"]


@case("prep_captions_caption_ext_png", "prep captions --caption-extension .png (images read as captions)",
      names="--caption-extension", needles=("image extension",))
def _(ws):
    return ["prep", "captions", _prep_data(ws), "--caption-extension", ".png", "--trigger", "zkw"]


@case("prep_captions_replace_without_equals", "prep captions --replace without OLD=NEW", names="--replace",
      needles=("OLD=NEW",))
def _(ws):
    return ["prep", "captions", _prep_data(ws), "--replace", "red hair"]


@case("prep_crop_two_inputs_one_output", "prep crop: face.png and face.jpg would both become OUT/face.png",
      names="face.png", needles=("face.jpg", "both be written"))
def _(ws):
    d = ws.root / "two"
    d.mkdir()
    write_image(d / "face.png", _face(1, 40))
    write_image(d / "face.jpg", _face(2, 40))
    return ["prep", "crop", d, "--out", ws.root / "cropped", "--size", "16", "--mode", "center"]


@case("prep_crop_case_variants_one_output", "prep crop: Face.png and face.webp (one output on case-insensitive disks)",
      names="face.png", needles=("both be written",))
def _(ws):
    d = ws.root / "two"
    d.mkdir()
    write_image(d / "Face.png", _face(1, 40))
    write_image(d / "face.webp", _face(2, 40))
    return ["prep", "crop", d, "--out", ws.root / "cropped", "--size", "16", "--mode", "center"]


@case("prep_crop_size_zero", "prep crop --size 0", names="--size", needles=("--size",))
def _(ws):
    return ["prep", "crop", _prep_data(ws), "--out", ws.root / "cropped", "--size", "0"]


@case("prep_crop_size_text", "prep crop --size big", names="--size", needles=("--size",))
def _(ws):
    return ["prep", "crop", _prep_data(ws), "--out", ws.root / "cropped", "--size", "big"]


@case("prep_crop_out_is_its_folder", "prep crop --out DIR itself", names="prep", needles=("another folder than DIR",))
def _(ws):
    d = _prep_data(ws)
    return ["prep", "crop", d, "--out", d, "--size", "16"]


@case("prep_crop_out_is_a_file", "prep crop --out an existing file", names="a.txt", needles=("not a folder",))
def _(ws):
    d = _prep_data(ws)
    return ["prep", "crop", d, "--out", d / "a.txt", "--size", "16"]


@case("prep_crop_out_not_empty", "prep crop into a non-empty folder without --overwrite", names="out",
      needles=("not empty", "--overwrite"))
def _(ws):
    return ["prep", "crop", _prep_data(ws), "--out", ws.out, "--size", "16"]


@case("merge_save_to_case_variant", "merge --save-to OWN.SAFETENSORS beside its input own.safetensors",
      names="OWN.SAFETENSORS", needles=("would overwrite the input",))
def _(ws):
    own = write_lora(ws.out / "own.safetensors")
    return ["merge", "--models", own, "--save-to", ws.out / "OWN.SAFETENSORS"]


@case("merge_save_to_hard_link", "merge --save-to a hard link to its input", names="linked.safetensors",
      needles=("would overwrite the input",))
def _(ws):
    own = write_lora(ws.out / "own.safetensors")
    os.link(own, ws.out / "linked.safetensors")
    return ["merge", "--models", own, "--save-to", ws.out / "linked.safetensors"]


@case("gen_out_inside_the_model_folder", "generate --out a folder inside --model", names="unet",
      needles=("would overwrite the input",))
def _(ws):
    return ws.generate()[:-1] + [ws.model / "unet"]


@case("job_output_over_its_network_weights", "output_dir/output_name.safetensors is its own network_weights",
      names="job.toml", needles=("output_name", "would overwrite the input"))
def _(ws):
    lora = write_lora(ws.out / "last.safetensors")
    return ws.train(network_weights=_q(lora), overwrite="true")


@case("job_output_dir_inside_the_model", "output_dir inside the model folder", names="job.toml",
      needles=("output_dir", "would overwrite the input"))
def _(ws):
    return ws.train(output_dir=_q(ws.model / "unet"))


@case("job_output_dir_is_the_data", "output_dir = train_data_dir", names="job.toml",
      needles=("output_dir", "would overwrite the input"))
def _(ws):
    return ws.train(output_dir=_q(ws.data))


# ---------------------------------------------------------------------------- issue 33: typed, finite, ranges
def _job_case(name: str, what: str, keys: dict, needles, extra: str = "") -> None:
    def build(ws):
        return ws.train(extra=extra, **keys)

    CASES.append(Case(name, what, build, "error", "job.toml", tuple(needles)))


_job_case("job_min_timestep_boolean", "[addift] min_timestep = true (read as 1 before)", {"method": '"addift"'},
          ("min_timestep", "not the boolean true"), extra="[addift]\nmin_timestep = true\n")
_job_case("job_network_dim_boolean", "network_dim = true", {"network_dim": "true"}, ("network_dim", "not the boolean"))
_job_case("job_learning_rate_boolean", "learning_rate = false", {"learning_rate": "false"},
          ("learning_rate", "not the boolean false"))
_job_case("job_flip_aug_word", 'flip_aug = "no" (kohya would read it as true)', {"flip_aug": '"no"'},
          ("flip_aug", "not the text 'no'"))
_job_case("job_cache_latents_word", 'cache_latents = "yes"', {"cache_latents": '"yes"'},
          ("cache_latents", "true or false"))
_job_case("job_use_8bit_adam_word", 'use_8bit_adam = "no" (read as true before)', {"use_8bit_adam": '"no"'},
          ("use_8bit_adam", "true or false"))
_job_case("job_base_weights_multiplier_word", 'base_weights_multiplier = "strong"',
          {"base_weights": '["preset.safetensors"]', "base_weights_multiplier": '"strong"'},
          ("base_weights_multiplier", "takes numbers"))
_job_case("job_validation_seed_negative", "validation_seed = -1", {"validation_seed": "-1"},
          ("validation_seed", "between 0 and"))
_job_case("job_network_args_conv_dim_negative", 'network_args = ["conv_dim=-4"]',
          {"network_args": '["conv_dim=-4"]'}, ("conv_dim", "greater than or equal to 1"))
_job_case("job_network_args_dropout_above_one", 'network_args = ["dropout=2.5"]',
          {"network_args": '["dropout=2.5"]'}, ("network_dropout", "less than 1"))
_job_case("job_network_args_rank_dropout_negative", 'network_args = ["rank_dropout=-0.1"]',
          {"network_args": '["rank_dropout=-0.1"]'}, ("rank_dropout", "greater than or equal to 0"))
_job_case("job_network_args_not_key_value", 'network_args = ["conv_dim"]', {"network_args": '["conv_dim"]'},
          ("network_args", "key=value"))
_job_case("job_network_args_conv_alpha_nan", 'network_args = ["conv_alpha=nan"]',
          {"network_args": '["conv_alpha=nan"]'}, ("conv_alpha", "finite"))
_job_case("job_network_args_unknown", 'network_args = ["conv_dimm=4"]', {"network_args": '["conv_dimm=4"]'},
          ("unknown network_args option",))
_job_case("job_mixed_precision_unknown", 'mixed_precision = "fp8"', {"mixed_precision": '"fp8"'},
          ("mixed_precision",))


@case("job_network_weights_loha_for_a_lora_job", "a LoHa file as network_weights of a LoRA job (its alpha was used)",
      names="loha.safetensors", needles=("another adapter algorithm", "network_algo"))
def _(ws):
    import torch

    from difflora.network.adapters import adapter_options
    from difflora.network.files import save_lora
    from difflora.network.lora import LoRANetwork, NetworkSpec

    model = _tiny("sd1")
    torch.manual_seed(0)
    net = LoRANetwork.create(model.lora_targets(), NetworkSpec(network_dim=2, network_alpha=8.0,
                                                               adapter=adapter_options("loha")))
    save_lora(net.kohya_state_dict(), ws.root / "loha.safetensors", model.lora_metadata())
    return ws.train(network_weights=_q(ws.root / "loha.safetensors"))


@case("job_validation_data_dir_symlink_loop", "validation_data_dir is a symlink loop", names="job.toml",
      needles=("validation_data_dir", "symlink loop"))
def _(ws):
    (ws.root / "loop").symlink_to(ws.root / "loop")
    return ws.train(validation_data_dir=_q(ws.root / "loop"))


# ---------------------------------------------------------------------------- issue 33: the path policy
def _restricted(ws: Workspace, *args, **keys) -> list:
    """A job under --restrict-paths on the embedded model (the corpus's tiny model lies outside the folder)."""
    return ["train", ws.job(**{"model": None, **keys}), "--restrict-paths", ws.root, *args]


def _outside(ws: Workspace) -> Path:
    elsewhere = ws.root.parent / f"{ws.root.name}-elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "file.safetensors").write_bytes(b"x")
    (elsewhere / "secret.png").write_bytes(b"x")
    return elsewhere


for _key in ("clip_l", "t5xxl", "ae"):
    def _build(ws, key=_key):
        return _restricted(ws, **{key: _q(_outside(ws) / "file.safetensors")})

    CASES.append(Case(f"restrict_flux_{_key}_outside", f"--restrict-paths: FLUX's {_key} file outside the folder",
                      _build, "error", "job.toml", (_key, "outside the allowed folder")))


@case("restrict_t5xxl_tokenizer_dotdot", "--restrict-paths: t5xxl_tokenizer = '../elsewhere'", names="job.toml",
      needles=("t5xxl_tokenizer", "outside the allowed folder"))
def _(ws):
    return _restricted(ws, t5xxl_tokenizer=_q(f"../{_outside(ws).name}"))


@case("restrict_network_weights_outside", "--restrict-paths: network_weights outside", names="job.toml",
      needles=("network_weights", "outside the allowed folder"))
def _(ws):
    return _restricted(ws, network_weights=_q(_outside(ws) / "file.safetensors"))


@case("restrict_validation_data_dir_outside", "--restrict-paths: validation_data_dir outside", names="job.toml",
      needles=("validation_data_dir", "outside the allowed folder"))
def _(ws):
    return _restricted(ws, validation_data_dir=_q(_outside(ws)))


@case("restrict_preset_lora_outside", "--restrict-paths: a preset LoRA outside", names="job.toml",
      needles=("preset_loras[0].path", "outside the allowed folder"))
def _(ws):
    return _restricted(ws, extra=f'[[preset_loras]]\npath = {_q(_outside(ws) / "file.safetensors")}\n')


@case("restrict_symlinked_image_in_data", "--restrict-paths: an image in the data folder symlinked outside",
      names="job.toml", needles=("train_data_dir", "a symlink to", "outside the allowed folder"))
def _(ws):
    (ws.images / "stolen.png").symlink_to(_outside(ws) / "secret.png")
    return _restricted(ws)


@case("restrict_symlinked_caption_in_pair_folder", "--restrict-paths: a caption in a pair folder symlinked outside",
      names="job.toml", needles=("image_dir", "a symlink to", "outside the allowed folder"))
def _(ws):
    pairs = ws.root / "pairs"
    pairs.mkdir()
    write_image(pairs / "001.png", _face(1))
    write_image(pairs / "001_after.png", _face(2))
    (pairs / "001.txt").symlink_to(_outside(ws) / "secret.png")
    return _restricted(ws, train_data_dir=None, extra='[[datasets]]\n[[datasets.subsets]]\nimage_dir = "pairs"\n')


@case("restrict_model_weights_index_outside", "--restrict-paths: a model folder whose weights index names a file "
      "outside", names="job.toml", needles=("model", "weights index", "outside the allowed folder"))
def _(ws):
    model = ws.root / "model"
    shutil.copytree(ws.model, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"conv_in.weight": f"../../../{_outside(ws).name}/file.safetensors"}}))
    return _restricted(ws, model=_q(model))


@case("restrict_allow_path_is_for_inputs", "--allow-path trusts inputs only: output_dir there is refused",
      names="job.toml", needles=("output_dir", "outside the allowed folder"))
def _(ws):
    elsewhere = _outside(ws)
    return _restricted(ws, "--allow-path", elsewhere, output_dir=_q(elsewhere / "out"))


@case("restrict_allow_path_without_restrict", "--allow-path without --restrict-paths", names="--allow-path",
      needles=("--restrict-paths",))
def _(ws):
    return ws.train("--allow-path", ws.root)


@case("restrict_dataset_config_image_dir_outside", "--restrict-paths: a dataset_config whose image_dir is outside",
      names="datasets.toml", needles=("image_dir", "outside the allowed folder"))
def _(ws):
    (ws.root / "datasets.toml").write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = {_q(_outside(ws))}\n')
    return _restricted(ws, train_data_dir=None, dataset_config=_q(ws.root / "datasets.toml"))


# ---------------------------------------------------------------------------- issue 33: model folders and files
def _model_copy(ws: Workspace, mutate: Callable[[Path], None]) -> Path:
    model = ws.root / "model"
    shutil.copytree(ws.model, model)
    mutate(model)
    return model


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _model_case(name: str, what: str, mutate: Callable[[Path], None], file: str, needles) -> None:
    def build(ws):
        return ["generate", "--model", _model_copy(ws, mutate), "--prompt", "a face", "--steps", "1", "--out", ws.out]

    CASES.append(Case(name, what, build, "error", file, tuple(needles)))


_model_case("model_unet_config_a_list", "unet/config.json holds a JSON list",
            lambda m: (m / "unet" / "config.json").write_text("[1, 2]"), "config.json", ("expected an object",))
_model_case("model_unet_channels_text", 'unet/config.json: block_out_channels = "wide"',
            lambda m: _edit_json(m / "unet" / "config.json", block_out_channels="wide"), "config.json",
            ("block_out_channels", "list of positive integers"))
_model_case("model_unet_in_channels_zero", "unet/config.json: in_channels = 0",
            lambda m: _edit_json(m / "unet" / "config.json", in_channels=0), "config.json",
            ("in_channels", "positive integer"))
_model_case("model_vae_latent_channels_text", 'vae/config.json: latent_channels = "four"',
            lambda m: _edit_json(m / "vae" / "config.json", latent_channels="four"), "config.json",
            ("latent_channels", "positive integer"))
_model_case("model_vae_config_not_json", "vae/config.json is not JSON",
            lambda m: (m / "vae" / "config.json").write_text("{ nope"), "config.json", ("not a readable JSON config",))
_model_case("model_text_encoder_layers_negative", "text_encoder/config.json: num_hidden_layers = -1",
            lambda m: _edit_json(m / "text_encoder" / "config.json", num_hidden_layers=-1), "config.json",
            ("num_hidden_layers", "positive integer"))
_model_case("model_scheduler_timesteps_text", 'scheduler_config.json: num_train_timesteps = "many"',
            lambda m: _edit_json(m / "scheduler" / "scheduler_config.json", num_train_timesteps="many"),
            "scheduler_config.json", ("num_train_timesteps", "positive integer"))


@functools.lru_cache(maxsize=None)
def _tiny_flux_folder() -> Path:
    import tempfile

    from difflora.toy.tiny_flux import build_tiny_flux

    folder = Path(tempfile.mkdtemp(prefix="difflora-corpus-flux-")) / "flux"
    build_tiny_flux("dev").save(folder)
    return folder


def _flux_case(name: str, what: str, mutate: Callable[[Path], None], file: str, needles) -> None:
    def build(ws):
        model = ws.root / "flux"
        shutil.copytree(_tiny_flux_folder(), model)
        mutate(model)
        return ["generate", "--model", model, "--prompt", "a face", "--steps", "1", "--width", "32", "--height", "32",
                "--out", ws.out]

    CASES.append(Case(name, what, build, "error", file, tuple(needles)))


_flux_case("flux_transformer_config_a_list", "FLUX transformer/config.json holds a JSON list",
           lambda m: (m / "transformer" / "config.json").write_text("[1, 2]"), "config.json", ("expected an object",))
_flux_case("flux_transformer_layers_text", 'FLUX transformer/config.json: num_layers = "two"',
           lambda m: _edit_json(m / "transformer" / "config.json", num_layers="two"), "config.json",
           ("num_layers", "positive integer"))
_flux_case("flux_transformer_heads_negative", "FLUX transformer/config.json: num_attention_heads = -1",
           lambda m: _edit_json(m / "transformer" / "config.json", num_attention_heads=-1), "config.json",
           ("num_attention_heads", "positive integer"))
_flux_case("flux_transformer_guidance_word", 'FLUX transformer/config.json: guidance_embeds = "yes"',
           lambda m: _edit_json(m / "transformer" / "config.json", guidance_embeds="yes"), "config.json",
           ("guidance_embeds", "true or false"))
_flux_case("flux_t5_config_d_model_text", 'FLUX text_encoder_2/config.json: d_model = "x"',
           lambda m: _edit_json(m / "text_encoder_2" / "config.json", d_model="x"), "config.json",
           ("d_model", "positive integer"))
_flux_case("flux_model_index_a_list", "FLUX model_index.json holds a JSON list",
           lambda m: (m / "model_index.json").write_text("[]"), "flux", ("not a JSON object",))


def _nan_transformer(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    first = sorted(k for k in tensors if tensors[k].is_floating_point() and tensors[k].dim() == 2)[0]
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))


_flux_case("flux_transformer_nan_weight", "a FLUX transformer with a NaN weight (drew a black image)", _nan_transformer,
           "NaN/inf", ("NaN/inf", "the model itself overflows"))


# ---------------------------------------------------------------------------- issue 33: the UI's server
@case("ui_workspace_is_a_file", "difflora ui --workspace naming a file", names="afile", needles=("a file",))
def _(ws):
    (ws.root / "afile").write_text("x")
    return ["ui", "--workspace", ws.root / "afile"]


@case("ui_allow_path_not_a_folder", "difflora ui --allow-path naming nothing", names="nowhere",
      needles=("--allow-path", "not a folder"))
def _(ws):
    return ["ui", "--workspace", ws.root / "uiws", "--allow-path", ws.root / "nowhere"]


@case("ui_second_server_on_a_workspace", "a second difflora ui on a workspace another one serves", names="uiws",
      needles=("another difflora ui", "serves this workspace"))
def _(ws):
    (ws.root / "uiws").mkdir()
    (ws.root / "uiws" / ".server.lock").write_text(f"{os.getpid()}\n")  # a live server's lock
    return ["ui", "--workspace", ws.root / "uiws"]


# ---- Qwen-Image (models/qwen_image/): a 2-block tiny model built in the workspace ---------------------------
@functools.lru_cache(maxsize=None)
def _tiny_qwen_source() -> Path:
    import tempfile

    from difflora.models.qwen_image.tiny import write_tiny_folder

    return write_tiny_folder(Path(tempfile.mkdtemp(prefix="difflora-corpus-qwen-")) / "Qwen-Image", num_layers=2)


def _qwen_folder(ws: Workspace, name: str = "Qwen-Image") -> Path:
    folder = ws.root / name
    shutil.copytree(_tiny_qwen_source(), folder)
    return folder


def _qwen_lora(path: Path) -> Path:
    """A Qwen-Image LoRA with musubi's names (block 0's attention) and a Qwen-Image base version."""
    import torch

    from difflora.network.files import save_lora

    tensors = {}
    for m in ("attn_to_q", "attn_to_k"):
        name = f"lora_unet_transformer_blocks_0_{m}"
        tensors.update({f"{name}.lora_down.weight": torch.zeros(2, 16), f"{name}.lora_up.weight": torch.zeros(16, 2),
                        f"{name}.alpha": torch.tensor(1.0)})
    save_lora(tensors, path, {"ss_base_model_version": "qwen_image"})
    return path


@case("qwen_lora_on_sd", "a Qwen-Image LoRA given to an SD model", names="qwen_lora.safetensors",
      needles=("trained for qwen_image", "sd_v1"))
def _(ws):
    return ws.generate("--lora", _qwen_lora(ws.root / "qwen_lora.safetensors"))


@case("sd_lora_on_qwen", "an SD LoRA given to a Qwen-Image model", names="sd_lora.safetensors",
      needles=("trained for sd_v1", "not Qwen-Image"))
def _(ws):
    folder = _qwen_folder(ws)
    lora = write_lora(ws.root / "sd_lora.safetensors")
    return ["generate", "--model", folder, "--prompt", "a face", "--steps", "2", "--width", "32", "--height", "32",
            "--out", ws.out, "--lora", lora]


@case("qwen_text_encoder_of_another_model", "a Qwen-Image transformer file with a VAE file as its text_encoder",
      names="qwen_image_vae.safetensors", needles=("not a Qwen2.5-VL text-encoder file",))
def _(ws):
    from difflora.models import load_model

    model = load_model(_tiny_qwen_source())
    from difflora.models.qwen_image.files import save_vae_file

    model.save(ws.root / "qwen_image_bf16.safetensors")
    save_vae_file(model, ws.root / "qwen_image_vae.safetensors")
    return ws.train(model=_q(ws.root / "qwen_image_bf16.safetensors"),
                    text_encoder=_q(ws.root / "qwen_image_vae.safetensors"),
                    vae=_q(ws.root / "qwen_image_vae.safetensors"), resolution="32")


@case("qwen_folder_without_vae", "a Qwen-Image folder whose vae/ is missing", names="Qwen-Image",
      needles=("vae/ folder", "missing"))
def _(ws):
    folder = _qwen_folder(ws)
    shutil.rmtree(folder / "vae")
    return ws.train(model=_q(folder), resolution="32")


@case("qwen_folder_without_tokenizer", "a Qwen-Image folder whose tokenizer/ is missing", names="Qwen-Image",
      needles=("tokenizer/ folder", "missing"))
def _(ws):
    folder = _qwen_folder(ws)
    shutil.rmtree(folder / "tokenizer")
    return ws.train(model=_q(folder), resolution="32")


@case("qwen_edit_variant_on_text_to_image", "model_variant = edit_2511 on the text-to-image Qwen-Image folder",
      names="Qwen-Image", needles=("model_variant = 'edit_2511'", "qwen_image"))
def _(ws):
    return ws.train(model=_q(_qwen_folder(ws)), model_variant='"edit_2511"', resolution="32")


# ---------------------------------------------------------------------------- writing it out
# ---- FLUX.2 (models/flux2): LoRAs of other families, its files, variants ---------------------
@functools.lru_cache(maxsize=1)
def _flux2_built() -> Path:
    """A tiny FLUX.2 klein-4B (diffusers folder, BFL file, text encoder / VAE / tokenizer files), built once."""
    import tempfile

    from difflora.models.flux2.tiny import write_tiny

    root = Path(tempfile.mkdtemp(prefix="difflora-flux2-corpus-"))
    write_tiny(root, "klein-4b")
    return root


def _flux2(ws: Workspace) -> Path:
    """The tiny FLUX.2 files inside this case's workspace."""
    dest = ws.root / "flux2"
    if not dest.exists():
        shutil.copytree(_flux2_built(), dest)
    return dest


def _flux2_generate(ws: Workspace, model: Path, *args) -> list:
    return ["generate", "--model", model, "--prompt", "a face", "--steps", "1", "--width", "32", "--height", "32",
            "--out", ws.out, *args]


def _flux2_lora(path: Path) -> Path:
    import torch

    from difflora.models.flux2.tiny import build_tiny_flux2
    from difflora.network.files import save_lora
    from difflora.network.lora import LoRANetwork, NetworkSpec

    model = build_tiny_flux2("klein-4b")
    torch.manual_seed(0)
    net = LoRANetwork.create(model.lora_targets(), NetworkSpec(network_dim=2, network_alpha=1.0))
    save_lora(net.kohya_state_dict(), path, model.lora_metadata())
    return path


@case("flux2_lora_on_sd1", "a FLUX.2 LoRA given to an SD1 model (generate --lora)", names="flux2.safetensors",
      needles=("flux2_klein_base_4b", "sd_v1"))
def _(ws):
    return ws.generate("--lora", _flux2_lora(ws.root / "flux2.safetensors"))


@case("sd1_lora_on_flux2", "an SD1 LoRA given to a FLUX.2 model (generate --lora)", names="sd1.safetensors",
      needles=("sd_v1", "not flux.2"))
def _(ws):
    return _flux2_generate(ws, _flux2(ws) / "diffusers", "--lora", write_lora(ws.root / "sd1.safetensors"))


@case("flux1_lora_on_flux2", "a FLUX.1 LoRA without metadata given to FLUX.2 (generate --lora)",
      names="flux1.safetensors", needles=("flux.1 lora",))
def _(ws):
    import torch
    from safetensors.torch import save_file

    from difflora.network.lora import LoRANetwork, NetworkSpec
    from difflora.toy.tiny_flux import build_tiny_flux

    net = LoRANetwork.create(build_tiny_flux("dev", 1, 1).lora_targets(), NetworkSpec(network_dim=2))
    tensors = {k: v.contiguous() for k, v in net.kohya_state_dict().items() if k.startswith("lora_unet_")}
    save_file(tensors, str(ws.root / "flux1.safetensors"))
    del torch
    return _flux2_generate(ws, _flux2(ws) / "diffusers", "--lora", ws.root / "flux1.safetensors")


@case("flux2_wrong_text_encoder", "a FLUX.2 file with its VAE given as the text encoder", names="vae.safetensors",
      needles=("not a qwen3 text encoder",))
def _(ws):
    f = _flux2(ws)
    return _flux2_generate(ws, f / "flux2-klein-4b.safetensors", "--text-encoder", f / "components/vae.safetensors",
                           "--vae", f / "components/vae.safetensors", "--qwen3-tokenizer", f / "components/tokenizer")


@case("flux2_missing_vae", "a FLUX.2 single file with a text encoder but no VAE", names="flux2-klein-4b.safetensors",
      needles=("set `vae`",))
def _(ws):
    f = _flux2(ws)
    return _flux2_generate(ws, f / "flux2-klein-4b.safetensors", "--text-encoder",
                           f / "components/text_encoder.safetensors")


@case("flux2_missing_tokenizer", "a Qwen3 text encoder file with no tokenizer folder beside it", names="tokenizer",
      needles=("no tokenizer",))
def _(ws):
    f = _flux2(ws)
    lone = ws.root / "lone"
    lone.mkdir()
    shutil.copy(f / "components/text_encoder.safetensors", lone / "qwen_3_4b.safetensors")
    return _flux2_generate(ws, f / "flux2-klein-4b.safetensors", "--text-encoder", lone / "qwen_3_4b.safetensors",
                           "--vae", f / "components/vae.safetensors")


@case("flux2_other_variant", "model_version of klein-9B given with a klein-4B file", names="flux2-klein-4b.safetensors",
      needles=("klein-9b", "klein-4b"))
def _(ws):
    return _flux2_generate(ws, _flux2(ws) / "flux2-klein-4b.safetensors", "--model-version", "klein-9b")


@case("flux1_file_as_flux2", "a FLUX.1 transformer file in a job with model_family = \"flux2\"",
      names="flux1-tiny.safetensors", needles=("flux.1",))
def _(ws):
    from difflora.toy.tiny_flux import build_tiny_flux

    build_tiny_flux("dev", 1, 1).save(ws.root / "flux1-tiny.safetensors")
    return ws.train(model=_q(ws.root / "flux1-tiny.safetensors"), model_family='"flux2"')


@case("flux2_file_as_flux1", "a FLUX.2 transformer file in a job with model_family = \"flux\"",
      names="flux2-klein-4b.safetensors", needles=("flux.2",))
def _(ws):
    return ws.train(model=_q(_flux2(ws) / "flux2-klein-4b.safetensors"), model_family='"flux"')


def _flux2_folder_case(name: str, what: str, mutate: Callable[[Path], None], names: str, needles) -> None:
    """`generate` on a copy of the tiny FLUX.2 diffusers folder that `mutate` damaged (the check_files hook
    refuses it before any weight is read, or the loader names the weight)."""
    def build(ws):
        folder = _flux2(ws) / "diffusers"
        mutate(folder)
        return _flux2_generate(ws, folder)

    CASES.append(Case(name, what, build, "error", names, tuple(needles)))


def _flux2_nan_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["single_transformer_blocks.3.attn.to_out.weight"].view(-1)[5] = float("nan")
    save_file(tensors, str(weights))


def _flux2_sharded(folder: Path, shard: str) -> None:
    """The transformer's weights behind an index whose weight_map names `shard`."""
    from safetensors.torch import load_file

    names = sorted(load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors")))
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: shard for n in names}}))


_flux2_folder_case("flux2_folder_without_vae", "a FLUX.2 diffusers folder without its vae/",
                   lambda f: shutil.rmtree(f / "vae"), "diffusers", ("missing its vae/",))
_flux2_folder_case("flux2_transformer_config_a_list", "FLUX.2 transformer/config.json holds a JSON list",
                   lambda f: (f / "transformer" / "config.json").write_text("[5, 20]"), "config.json",
                   ("expected an object",))
_flux2_folder_case("flux2_transformer_layers_text", 'FLUX.2 transformer/config.json: num_single_layers = "twenty"',
                   lambda f: _edit_json(f / "transformer" / "config.json", num_single_layers="twenty"), "config.json",
                   ("num_single_layers", "positive integer"))
_flux2_folder_case("flux2_transformer_guidance_word", 'FLUX.2 transformer/config.json: guidance_embeds = "no"',
                   lambda f: _edit_json(f / "transformer" / "config.json", guidance_embeds="no"), "config.json",
                   ("guidance_embeds", "true or false"))
_flux2_folder_case("flux2_text_encoder_other_width", "a FLUX.2 folder whose text encoder is of another width",
                   lambda f: _edit_json(f / "text_encoder" / "config.json", hidden_size=24), "config.json",
                   ("3 layers of 24", "different models"))
_flux2_folder_case("flux2_vae_other_latents", "a FLUX.2 folder whose VAE has FLUX.1's 16 latent channels",
                   lambda f: _edit_json(f / "vae" / "config.json", latent_channels=16), "config.json",
                   ("16 latent channels", "different models"))
_flux2_folder_case("flux2_weight_index_outside", "a FLUX.2 transformer index naming a shard outside its folder",
                   lambda f: _flux2_sharded(f, "../../secret.safetensors"), "index.json", ("outside its folder",))
_flux2_folder_case("flux2_weight_index_missing_shard", "a FLUX.2 transformer index naming a shard that is not there",
                   lambda f: _flux2_sharded(f, "diffusion_pytorch_model-00001-of-00002.safetensors"), "index.json",
                   ("not there", "00001-of-00002"))
_flux2_folder_case("flux2_weight_index_a_list", "a FLUX.2 transformer index holding a JSON list",
                   lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text("[]"),
                   "index.json", ("weight_map",))
_flux2_folder_case("flux2_transformer_nan_weight", "a FLUX.2 transformer with a NaN weight", _flux2_nan_weight,
                   "transformer", ("single_transformer_blocks.3.attn.to_out.weight", "NaN/inf"))


@case("flux2_single_file_nan_weight", "a FLUX.2 BFL single file with an inf weight (merge --model)",
      names="flux2-klein-4b.safetensors", needles=("single_blocks.3.linear2.weight", "NaN/inf"))
def _(ws):
    from safetensors.torch import load_file, save_file

    from difflora.fileio import read_safetensors_header

    f = _flux2(ws) / "flux2-klein-4b.safetensors"
    md = read_safetensors_header(f)[1]
    tensors = load_file(str(f))
    tensors["single_blocks.3.linear2.weight"].view(-1)[0] = float("inf")
    save_file(tensors, str(f), metadata=md)
    return ["merge", "--model", f, "--models", _flux2_lora(ws.root / "l.safetensors"), "--save-to",
            ws.out / "merged.safetensors"]


@case("flux2_blockwise_fp8", "a FLUX.2 fp8 file with block-wise weight scales (int8/block formats)",
      names="flux2-fp8.safetensors", needles=("double_blocks.0.img_attn.qkv.weight", "block-wise"))
def _(ws):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(_flux2(ws) / "flux2-klein-4b.safetensors"))
    w = tensors["double_blocks.0.img_attn.qkv.weight"]
    tensors["double_blocks.0.img_attn.qkv.weight"] = w.to(torch.float8_e4m3fn)
    tensors["double_blocks.0.img_attn.qkv.weight_scale"] = torch.ones(2, 2)
    save_file(tensors, str(ws.root / "flux2-fp8.safetensors"))
    return ["merge", "--model", ws.root / "flux2-fp8.safetensors", "--models", _flux2_lora(ws.root / "l.safetensors"),
            "--save-to", ws.out / "merged.safetensors"]


# ---- Z-Image (models/zimage/) -------------------------------------------
@functools.lru_cache(maxsize=1)
def _tiny_zimage_files() -> dict:
    """The tiny Z-Image's diffusers folder and ComfyUI files, built once per process (cases copy them)."""
    import tempfile

    from difflora.models.zimage.tiny import write_tiny_zimage

    return write_tiny_zimage(Path(tempfile.mkdtemp(prefix="difflora-zimage-corpus-")))


def _zimage_folder(ws: Workspace, without: str | None = None) -> Path:
    folder = ws.root / "zimage"
    shutil.copytree(_tiny_zimage_files()["folder"], folder)
    if without:
        shutil.rmtree(folder / without)
    return folder


def _zimage_lora(path: Path) -> Path:
    import torch

    from difflora.network.files import save_lora

    t = {}
    for i in range(30):
        t[f"lora_unet_layers_{i}_attention_qkv.lora_down.weight"] = torch.zeros(2, 32)
        t[f"lora_unet_layers_{i}_attention_qkv.lora_up.weight"] = torch.full((96, 2), 0.01)
    save_lora(t, path, {"ss_base_model_version": "zimage"})
    return path


@case("zimage_lora_on_sd", "a Z-Image LoRA given to an SD model", names="zimage_lora.safetensors",
      needles=("trained for zimage", "sd_v1"))
def _(ws):
    return ws.generate("--lora", _zimage_lora(ws.root / "zimage_lora.safetensors"))


@case("sd_lora_on_zimage", "an SD LoRA as a preset on a Z-Image model", names="sd_lora.safetensors",
      needles=("sd_v1", "not z-image"))
def _(ws):
    lora = write_lora(ws.root / "sd_lora.safetensors")
    return ws.train(model=_q(_zimage_folder(ws)), resolution="32", zimage_variant='"turbo"',
                    extra=f"[[preset_loras]]\npath = {_q(lora)}\n")


@case("zimage_wrong_text_encoder", "a Z-Image single file with the ae file as its text encoder",
      names="ae.safetensors", needles=("not a qwen3 text encoder",))
def _(ws):
    files = _tiny_zimage_files()
    ae = ws.root / "ae.safetensors"
    shutil.copy(files["vae"], ae)
    return ws.train(model=_q(files["transformer"]), resolution="32", text_encoder=_q(ae), vae=_q(ae))


@case("zimage_missing_vae_folder", "a Z-Image diffusers folder without vae/", names="zimage",
      needles=("without vae/",))
def _(ws):
    return ws.train(model=_q(_zimage_folder(ws, without="vae")), resolution="32", zimage_variant='"turbo"')


@case("zimage_missing_tokenizer_folder", "a Z-Image diffusers folder without tokenizer/", names="zimage",
      needles=("without tokenizer/",))
def _(ws):
    return ws.train(model=_q(_zimage_folder(ws, without="tokenizer")), resolution="32", zimage_variant='"base"')


@case("zimage_variant_unknown", "a Z-Image folder without zimage_variant (the weights cannot tell)",
      names="zimage", needles=("zimage_variant", "turbo", "base"))
def _(ws):
    return ws.train(model=_q(_zimage_folder(ws)), resolution="32")


@case("zimage_key_on_sd", "zimage_variant set for an SD model", names="job.toml",
      needles=("zimage_variant", "applies to Z-Image"))
def _(ws):
    return ws.train(zimage_variant='"base"')


@case("flux_key_on_zimage", "FLUX.1's guidance_scale set for a Z-Image model", names="zimage",
      needles=("guidance_scale", "z-image has none"))
def _(ws):
    return ws.train(model=_q(_zimage_folder(ws)), resolution="32", zimage_variant='"turbo"', guidance_scale="2.0")


# ---- edit methods and generate --control (methods/edit.py) --------------------------------
def _edit_pairs(ws: Workspace, n: int = 2, side: int = 32, captions: bool = True) -> Path:
    pairs = ws.root / "pairs"
    pairs.mkdir()
    for i in range(n):
        write_image(pairs / f"{i:03d}.png", _face(i, side))
        write_image(pairs / f"{i:03d}_after.png", _face(i + 10, side))
        if captions:
            (pairs / f"{i:03d}.txt").write_text("a face", encoding="utf-8")
    return pairs


@case("edit_method_on_sd1", "method = edit on a Stable Diffusion 1 model (it takes no control image)",
      names="tiny_sd1", needles=("method edit", "edit model that takes a control image"))
def _(ws):
    return ws.train(method='"edit"', train_data_dir=None,
                    extra=f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = {_q(_edit_pairs(ws, side=16))}\n")


@case("edit_pair_without_instruction", "method = edit on FLUX.2 with a pair that has no instruction file, caption "
      "or edit_instruction", names="000.instruction.txt", needles=("has no instruction", "edit_instruction"))
def _(ws):
    pairs = _edit_pairs(ws, captions=False)
    return ws.train(model=_q(_flux2(ws) / "diffusers"), method='"edit"', train_data_dir=None, resolution="32",
                    extra=f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = {_q(pairs)}\n")


@case("generate_control_on_sd1", "generate --control with a Stable Diffusion 1 model", names="tiny_sd1",
      needles=("--control", "cannot take a control image"))
def _(ws):
    return ws.generate("--control", write_image(ws.root / "before.png", _face(1, 16)))


@case("generate_too_many_controls", "generate --control eleven times with FLUX.2 (it takes up to 10 reference "
      "images)", names="diffusers", needles=("at most 10 control image", "11 were given"))
def _(ws):
    images = [write_image(ws.root / f"ref{i}.png", _face(i, 32)) for i in range(11)]
    return _flux2_generate(ws, _flux2(ws) / "diffusers", *[a for im in images for a in ("--control", im)])


def readme_table() -> str:
    rows = ["| case | input | expected |", "|---|---|---|"]
    for c in CASES:
        if c.outcome == "error":
            exp = f"exit 2, names `{c.names}`: " + ", ".join(f"“{n}”" for n in c.needles)
        else:
            exp = "exit 0 (handled)" + (": warns " + ", ".join(f"“{n}”" for n in c.log) if c.log else "")
        rows.append(f"| `{c.name}` | {c.what} | {exp} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", help="folder to write every case's workspace to")
    ap.add_argument("--model", help="a tiny SD1 diffusers folder (default: built here)")
    ap.add_argument("--readme", action="store_true", help="rewrite the case table in README.md")
    args = ap.parse_args(argv)
    if args.readme:
        readme = Path(__file__).with_name("README.md")
        text = readme.read_text(encoding="utf-8")
        start, end = "<!-- cases -->\n", "<!-- /cases -->"
        head, rest = text.split(start, 1)
        readme.write_text(head + start + readme_table() + end + rest.split(end, 1)[1], encoding="utf-8")
        return 0
    if not args.out:
        ap.error("give OUT (or --readme)")
    out = Path(args.out)
    model = Path(args.model) if args.model else None
    if model is None:
        model = out / "_tiny_sd1"
        if not model.exists():
            _tiny("sd1").save(model)
    for c in CASES:
        ws = Workspace(out / c.name, model)
        cmd = c.build(ws)
        (ws.root / "case.json").write_text(json.dumps(
            {"what": c.what, "outcome": c.outcome, "command": ["difflora"] + [str(a) for a in cmd],
             "names": c.names, "needles": list(c.needles), "log": list(c.log)}, indent=2) + "\n")
    print(f"{len(CASES)} cases written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
