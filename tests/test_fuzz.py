"""Fuzzing the readers of user input: the only exception they may raise is UserError.

Job TOMLs (random text, TOML-ish lines built from the real keys, random nested structures,
`--set` overrides), LoRA files (random bytes, mutated valid files, random headers and metadata),
captions (random bytes and rules) and images (random bytes, mutated valid files). Derandomized
with small example counts so CI is deterministic and the whole file runs in well under a minute.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save as st_save

from difflora.config import JobConfig, load_job
from difflora.data.captions import CaptionRules, process_caption, read_caption
from difflora.data.images import load_image
from difflora.errors import UserError
from difflora.network.files import load_lora

# DIFFLORA_FUZZ_EXAMPLES=5000 fuzzes deeper (and with fresh randomness) on a developer's machine.
_DEEP = int(os.environ.get("DIFFLORA_FUZZ_EXAMPLES", "0"))
FUZZ = settings(derandomize=not _DEEP, deadline=None, database=None, max_examples=_DEEP or 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _only_user_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        return None


# ---------------------------------------------------------------------------- job TOML
KEYS = sorted(JobConfig.model_fields) + ["netwrok_dim", "x", "", "a.b", "general.batch_size"]
PATH_KEYS = ["model", "network_weights", "train_data_dir", "reg_data_dir", "dataset_config", "output_dir",
             "logging_dir", "sample_prompts"]
_key = st.one_of(st.sampled_from(PATH_KEYS), st.sampled_from(KEYS))  # paths are where the filesystem meets input
DEEP = "[" * 3000 + "]" * 3000
TABLES = ["[general]", "[[datasets]]", "[[datasets.subsets]]", "[addift]", "[copier]", "[[preset_loras]]", "[slider]",
          "[optimizer_args]", "[datasets]", "[[general]]", "[network_dim]"]
SCALARS = st.one_of(
    st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: "nan" if math.isnan(f) else
                                                       ("inf" if f > 0 else "-inf") if math.isinf(f) else repr(f)),
    st.sampled_from(['"a\\u0000b"', '"."', '""', '"../../etc"', '"~"', '"~nobody/x"', DEEP, "{ a = " + DEEP + " }"]),
    st.sampled_from(["true", "false", '"standard"', '"addift"', '"AdamW"', '"fp16"', "1979-05-27", "[]", "{}",
                     "[1, 2]", '["a", 1]', "{ a = 1 }", '{ path = "x" }', "[[1], [2]]", '"""multi\nline"""', "'lit'",
                     "0x10", "1e999", "-0.0"]),
    st.text(max_size=20).map(json.dumps),
)


@st.composite
def toml_ish(draw):
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.sampled_from(TABLES)))
        elif kind == 1:
            lines.append(draw(st.text(max_size=30)))
        else:
            lines.append(f"{draw(_key)} = {draw(SCALARS)}")
    return "\n".join(lines)


def _load_text(scratch: Path, text: str | bytes, overrides=None):
    path = scratch / "job.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return _only_user_errors(load_job, path, overrides)


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_fuzz_job_random_text(scratch, text):
    _load_text(scratch, text)


@FUZZ
@given(toml_ish())
@example('output_dir = "out\\u0000put"')  # was: ValueError (embedded null byte) from Path.resolve
@example('dataset_config = "."')  # was: IsADirectoryError
@example("optimizer_args = { a = " + DEEP + " }")  # was: RecursionError in tomllib
def test_fuzz_job_toml_ish(scratch, text):
    _load_text(scratch, 'train_data_dir = "data"\n' + text)
    _load_text(scratch, text)


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                  st.text(st.characters(max_codepoint=0x2FF), max_size=12),  # NUL and control characters included
                  st.sampled_from(["standard", "addift", "slider", "AdamW", "cosine", "fp16", ".", "", "a\x00b"]))
_tree = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(st.one_of(_key, st.sampled_from(
                                                        ["image_dir", "after_dir", "subsets", "path", "multiplier"])),
                                                                    inner, max_size=4)), max_leaves=12)


def _drop_none(x):
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_none(v) for v in x if v is not None]
    return x


@FUZZ
@given(st.dictionaries(_key, _tree, max_size=6))
def test_fuzz_job_random_structures(scratch, data):
    data = _drop_none(data)
    data.setdefault("train_data_dir", "data")
    try:
        text = tomli_w.dumps(data)
    except (TypeError, ValueError):
        return  # not representable as TOML (e.g. mixed arrays in old tomli-w)
    _load_text(scratch, text)


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=40),
                          st.builds(lambda k, v: f"{k}={v}",
                                    st.one_of(_key, st.sampled_from(["addift.multiplier", "a.b.c", "model.x"])),
                                    SCALARS)), max_size=4))
@example(["model=" + DEEP])  # was: RecursionError
@example(['dataset_config="."'])  # was: IsADirectoryError
def test_fuzz_set_overrides(scratch, overrides):
    _load_text(scratch, 'train_data_dir = "data"\nnetwork_dim = 4\n', overrides)


# ---------------------------------------------------------------------------- LoRA files
def _valid_lora_bytes() -> bytes:
    g = torch.Generator().manual_seed(0)
    t = {}
    for name, (i, o) in {"lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8),
                         "lora_te_text_model_encoder_layers_0_mlp_fc1": (8, 16)}.items():
        t[f"{name}.lora_down.weight"] = torch.randn(2, i, generator=g)
        t[f"{name}.lora_up.weight"] = torch.randn(o, 2, generator=g)
        t[f"{name}.alpha"] = torch.tensor(1.0)
    return st_save(t, {"ss_network_dim": "2", "ss_base_model_version": "sd_v1"})


VALID = _valid_lora_bytes()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


def _read_lora(scratch: Path, data: bytes, name: str = "f.safetensors"):
    path = scratch / name
    path.write_bytes(data)
    lora = _only_user_errors(load_lora, path)
    if lora is not None:  # what loads must be usable
        for n in lora.module_names():
            lora.rank_alpha(n)
    return lora


_odd_headers = st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"a": ' * 3000 + b"1" + b"}" * 3000, b"null", b"[]",
                                 b'"x"', b'{"a": {"data_offsets": "xy"}}', b'{"a": {"data_offsets": [NaN, 1]}}',
                                 b'{"a": {"data_offsets": [0, 1, 2]}}', b'{"a": 1}', b'{"__metadata__": [1]}',
                                 b'{"__metadata__": {"a": {"b": 1}}}', b"\xff\xfe"])


@FUZZ
@given(st.one_of(st.binary(max_size=400), _odd_headers))
@example(b"[" * 5000 + b"]" * 5000)  # was: RecursionError in json.loads
def test_fuzz_lora_random_bytes(scratch, data):
    _read_lora(scratch, data)
    _read_lora(scratch, struct.pack("<Q", len(data)) + data)  # a plausible length, random header


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.booleans())
def test_fuzz_lora_mutated_valid_file(scratch, flips, header_only):
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos % HEADER_END if header_only else pos] = value
    _read_lora(scratch, bytes(data))


@FUZZ
@given(st.integers(0, len(VALID)))
def test_fuzz_lora_truncated(scratch, n):
    lora = _read_lora(scratch, VALID[:n])
    assert (lora is not None) == (n == len(VALID))


_dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "C64", "F8_E4M3", "X", ""])
_names = st.sampled_from(["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha",
                          "lora_te_b.lora_down.weight", "unet.x.lora_A.weight", "unet.x.lora_B.weight",
                          "unet.x.lora_A.default.weight", "unet.x.alpha", "lora_unet_a.hada_w1_a", "dora_scale", "w"])


@st.composite
def random_header(draw):
    header, data_len = {}, 0
    for _ in range(draw(st.integers(0, 4))):
        shape = draw(st.lists(st.integers(0, 3), max_size=4))
        dtype = draw(_dtypes)
        size = int(np.prod(shape)) * {"F64": 8, "I64": 8, "C64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(dtype, 1)
        if draw(st.booleans()):
            size = draw(st.integers(0, 64))
        header[draw(_names)] = {"dtype": dtype, "shape": shape, "data_offsets": [data_len, data_len + size]}
        data_len += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(
            st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
            st.dictionaries(st.sampled_from(["lora_adapter_metadata", "ss_base_model_version"]),
                            st.one_of(st.text(max_size=10), st.sampled_from(['{"lora_alpha": "x"}', '{"lora_alpha": []}',
                                                                             '{"lora_alpha": 4}', "[1]", "null"])),
                            max_size=2),
            st.just([1, 2]), st.just("x")))
    return header, data_len


def _entries(*specs):
    header, offset = {}, 0
    for name, shape in specs:
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


@FUZZ
@given(random_header(), st.integers(-8, 8), st.binary(max_size=64))
@example(_entries(("lora_unet_a.lora_down.weight", [2, 2]), ("lora_unet_a.lora_up.weight", [4])), 0, b"")  # IndexError
@example(_entries(("unet.x.lora_A.weight", []),), 0, b"")  # was: IndexError in the peft alpha default
@example(({**_entries(("unet.x.lora_A.weight", [2, 4]), ("unet.x.lora_B.weight", [4, 2]))[0],
           "__metadata__": {"lora_adapter_metadata": '{"lora_alpha": "x"}'}}, 64), 0, b"")  # was: ValueError
def test_fuzz_lora_random_headers(scratch, header_and_len, slack, fill):
    header, data_len = header_and_len
    raw = json.dumps(header).encode()
    body = (fill * (data_len // max(1, len(fill)) + 1))[: max(0, data_len + slack)] if fill else b"\0" * max(0, data_len + slack)
    _read_lora(scratch, struct.pack("<Q", len(raw)) + raw + body)


# ---------------------------------------------------------------------------- captions
@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_read_caption(scratch, data):
    path = scratch / "c.txt"
    path.write_bytes(data)
    text = _only_user_errors(read_caption, path)
    assert text is None or "\n" not in text


_rules = st.builds(CaptionRules, shuffle_caption=st.booleans(), keep_tokens=st.integers(0, 5),
                   keep_tokens_separator=st.sampled_from(["", "|||", ",", " "]),
                   caption_separator=st.sampled_from([",", "", " ", ";", ",,"]),
                   caption_prefix=st.text(max_size=10), caption_suffix=st.text(max_size=10),
                   caption_dropout_rate=st.floats(0, 1), caption_dropout_every_n_epochs=st.integers(0, 3),
                   caption_tag_dropout_rate=st.floats(0, 1))


@FUZZ
@given(st.text(max_size=200), _rules, st.integers(0, 2**32 - 1), st.integers(0, 5))
def test_fuzz_process_caption(text, rules, seed, epoch):
    out = _only_user_errors(process_caption, text, rules, np.random.default_rng(seed), epoch)
    assert out is None or isinstance(out, str)


# ---------------------------------------------------------------------------- images
def _image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    out = []
    for fmt, mode in (("PNG", "RGB"), ("PNG", "P"), ("PNG", "RGBA"), ("JPEG", "RGB"), ("BMP", "RGB"), ("GIF", "P"),
                      ("WEBP", "RGB"), ("PNG", "I;16")):
        im = Image.fromarray(arr)
        im = im.convert("P") if mode == "P" else im.convert("RGBA") if mode == "RGBA" else im
        if mode == "I;16":
            im = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


IMAGES = _image_seeds()


@FUZZ
@given(st.sampled_from(range(len(IMAGES))), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(0, 10**6)), st.sampled_from([".png", ".jpg", ".bmp", ".webp"]))
def test_fuzz_load_image_mutated(scratch, which, flips, cut, suffix):
    data = bytearray(IMAGES[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = scratch / f"img{suffix}"
    path.write_bytes(bytes(data))
    img = _only_user_errors(load_image, path)
    assert img is None or (img.mode == "RGB" and min(img.size) >= 8)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_load_image_random_bytes(scratch, data):
    path = scratch / "x.png"
    path.write_bytes(data)
    _only_user_errors(load_image, path)
