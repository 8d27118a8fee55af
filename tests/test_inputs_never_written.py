"""Nothing a command reads is ever written (fileio.check_writes): each case of issue 33's list.

Every case runs the real CLI and asserts exit code 2, one line naming the problem, and every
file of the dataset byte-identical afterwards (and nothing added to it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _image(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def data(tmp_path) -> Path:
    """A folder with two pairs and a single image, each with a caption."""
    d = tmp_path / "data"
    for i, name in enumerate(("a", "a_after", "b", "b_after", "c")):
        _image(d / f"{name}.png", i)
        (d / f"{name}.txt").write_text(f"caption {name}\n")
    return d


def _refused(run_cli, folder: Path, *args, needles=()) -> str:
    before = _snapshot(folder)
    code, out, err = run_cli(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("difflora: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert _snapshot(folder) == before
    return lines[0]


def test_tag_refuses_an_image_extension_for_captions(data, run_cli):
    _refused(run_cli, data, "prep", "tag", data, "--tagger", "toy", "--caption-extension", ".png", "--overwrite",
             needles=("image extension",))
    _refused(run_cli, data, "prep", "tag", data, "--tagger", "toy", "--caption-extension", "JPG", "--overwrite",
             needles=("image extension",))


def test_tag_refuses_two_images_that_share_a_caption_file(tmp_path, run_cli):
    d = tmp_path / "d"
    _image(d / "face.png", 0)
    _image(d / "face.jpg", 1)
    _refused(run_cli, d, "prep", "tag", d, "--tagger", "toy", needles=("face.jpg", "face.png", "both"))


def test_tag_checks_every_image_before_writing_a_caption(tmp_path, run_cli):
    d = tmp_path / "d"
    for i in range(7):
        _image(d / f"{i:03d}.png", i)
    (d / "005.png").write_bytes((d / "005.png").read_bytes()[:60])  # truncated, after five good ones
    line = _refused(run_cli, d, "prep", "tag", d, "--tagger", "toy", "--batch-size", "2")
    assert "005.png" in line and not list(d.glob("*.txt"))


def test_pairs_report_cannot_be_an_input(data, run_cli):
    _refused(run_cli, data, "prep", "pairs", data, "--json", data / "a.png", needles=("overwrite the input",))
    _refused(run_cli, data, "prep", "pairs", data, "--json", data / "b.txt", needles=("overwrite the input",))
    link = data.parent / "link.json"
    link.symlink_to(data / "a_after.png")  # through a symlink
    _refused(run_cli, data, "prep", "pairs", data, "--json", link, needles=("overwrite the input",))
    _refused(run_cli, data, "prep", "pairs", data, "--json", data / "A.PNG", needles=("overwrite the input",))


def test_pairs_report_cannot_be_an_aligned_image(data, tmp_path, run_cli):
    out = tmp_path / "aligned"
    line = _refused(run_cli, tmp_path, "prep", "pairs", data, "--align", "--out", out, "--json", out / "a_after.png")
    assert "both be written" in line and not out.exists()


def test_captions_report_cannot_be_an_input(data, run_cli):
    _refused(run_cli, data, "prep", "captions", data, "--trigger", "zkw", "--report", data / "c.png",
             needles=("overwrite the input",))
    _refused(run_cli, data, "prep", "captions", data, "--trigger", "zkw", "--report", data / "c.txt",
             needles=("overwrite the input",))
    hard = data.parent / "hard.json"
    os.link(data / "b.png", hard)  # a hard link is the same file under another name
    _refused(run_cli, data, "prep", "captions", data, "--trigger", "zkw", "--report", hard,
             needles=("overwrite the input",))
    _refused(run_cli, data, "prep", "captions", data, "--caption-extension", ".png", "--trigger", "zkw",
             needles=("image extension",))


def test_crop_refuses_two_inputs_cropped_to_one_file(tmp_path, run_cli):
    d = tmp_path / "d"
    _image(d / "face.png", 0, 40)
    _image(d / "face.jpg", 1, 40)
    line = _refused(run_cli, tmp_path, "prep", "crop", d, "--out", tmp_path / "out", "--size", "16",
                    "--mode", "center")
    assert "face.jpg" in line and "face.png" in line and not (tmp_path / "out").exists()
    e = tmp_path / "e"  # names that differ only by case are one file on case-insensitive file systems
    _image(e / "Face.png", 0, 40)
    _image(e / "face.webp", 1, 40)
    _refused(run_cli, tmp_path, "prep", "crop", e, "--out", tmp_path / "out", "--size", "16", "--mode", "center",
             needles=("both be written",))


def test_tools_refuse_an_input_as_output_through_a_symlink(tmp_path, run_cli):
    import torch

    from difflora.fileio import save_safetensors

    a = tmp_path / "a.safetensors"
    save_safetensors({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
                      "lora_unet_x.alpha": torch.tensor(2.0)}, a)
    (tmp_path / "link.safetensors").symlink_to(a)
    _refused(run_cli, tmp_path, "merge", "--models", a, "--save-to", tmp_path / "link.safetensors",
             needles=("overwrite the input",))
    _refused(run_cli, tmp_path, "resize", "--model", a, "--new-rank", "1", "--save-to", tmp_path / "A.safetensors",
             needles=("overwrite the input",))


def test_train_refuses_to_save_over_its_network_weights(tmp_path, tiny_sd1_dir, faces16, run_cli):
    import shutil

    import torch

    from difflora.fileio import save_safetensors

    out = tmp_path / "out"
    out.mkdir()
    save_safetensors({"w": torch.zeros(1)}, out / "last.safetensors")
    job = tmp_path / "job.toml"
    job.write_text(f'model = "{tiny_sd1_dir}"\ntrain_data_dir = "{faces16}"\nresolution = 16\nmax_train_steps = 1\n'
                   f'output_dir = "{out}"\noverwrite = true\nlog_with = "none"\n'
                   f'network_weights = "{out / "last.safetensors"}"\n')
    _refused(run_cli, tmp_path, "train", job, needles=("output_name", "overwrite the input"))
    shutil.rmtree(out)
    job.write_text(job.read_text().replace(f'output_dir = "{out}"', f'output_dir = "{tiny_sd1_dir / "unet"}"')
                   .replace(f'network_weights = "{out / "last.safetensors"}"\n', ""))
    _refused(run_cli, tmp_path, "train", job, needles=("output_dir", "overwrite the input"))
