"""`difflora prep`: crop, pair alignment, taggers (WD14 ONNX, BLIP-style, toy), caption editing."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difflora.data.alignment import align, changed_mask, measure
from difflora.prep.crop import plan_crop

ROOT = Path(__file__).resolve().parents[1]


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ---------------------------------------------------------------------------- crop
def test_focus_crop_keeps_toy_faces_that_center_crop_cuts():
    import importlib.util

    spec = importlib.util.spec_from_file_location("focus_crop_bench", ROOT / "bench" / "focus_crop.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.measure(200)  # README: 500 faces, `python bench/focus_crop.py`
    jittered, as_rendered = r["jittered"], r["as rendered"]
    assert jittered["focus"] >= 0.98 and jittered["center"] < jittered["focus"] - 0.2
    # As rendered the head is taller than a 3:2 crop: focus must cut hair, not the chin.
    assert as_rendered["focus"] >= 0.98 and as_rendered["center"] < as_rendered["focus"] - 0.1


# Subject boxes (left, top, right, bottom) read off scikit-image's bundled photographs by eye.
PHOTO_SUBJECTS = [
    ("chelsea", (300, 300), (140, 85, 345, 265)),  # the cat's eyes and nose; 451x300 -> square
    ("coffee", (400, 400), (172, 18, 410, 290)),  # the cup; 600x400 -> square
    ("rocket", (427, 427), (298, 125, 342, 405)),  # the rocket; 640x427 -> square
    ("rocket", (285, 427), (298, 125, 342, 405)),  # the same, 2:3 portrait
    ("astronaut", (341, 512), (150, 20, 300, 190)),  # her head; 512x512 -> 2:3 portrait
    ("astronaut", (512, 341), (150, 20, 300, 190)),  # the same, 3:2 landscape: the suit outweighs her face
]


@pytest.mark.parametrize("name,size,subject", PHOTO_SUBJECTS, ids=[f"{n}-{s[0]}x{s[1]}" for n, s, _ in PHOTO_SUBJECTS])
def test_focus_crop_contains_the_subject_of_real_photos(name, size, subject):
    import skimage.data

    img = getattr(skimage.data, name)()[..., :3]
    plan = plan_crop([img], "focus", size, aspect_buckets=False, no_upscale=False)
    box = plan.box
    assert (box[2] - box[0], box[3] - box[1]) == size  # the largest box of the target aspect
    assert box[0] <= subject[0] and box[1] <= subject[1] and box[2] >= subject[2] and box[3] >= subject[3], box


def test_skin_map_separates_skin_from_hair_and_cloth():
    from difflora.prep.saliency import skin_map

    colours = {"light skin": (238, 200, 170), "dark skin": (120, 80, 55), "astronaut's face": (198, 160, 135),
               "brown hair": (105, 62, 30), "blonde hair": (235, 205, 110), "orange suit": (217, 101, 65),
               "grey wall": (150, 150, 150), "black hair": (25, 22, 22)}
    score = {k: float(skin_map(np.array([[v]], np.uint8))[0, 0]) for k, v in colours.items()}
    assert min(score[k] for k in ("light skin", "dark skin", "astronaut's face")) > 0.6, score
    assert max(v for k, v in score.items() if "skin" not in k and "face" not in k) < 0.05, score


def test_crop_cli_pairs_share_one_box_and_captions_follow(tmp_path, run_cli):
    rng = np.random.default_rng(0)
    before = (rng.random((60, 120, 3)) * 40 + 100).astype(np.uint8)
    before[20:40, 85:105] = (250, 30, 30)  # a subject off to the right
    after = before.copy()
    after[25:35, 90:100] = (30, 30, 250)  # the change, inside the subject
    _save(before, tmp_path / "in" / "p.png")
    _save(after, tmp_path / "in" / "p_after.png")
    (tmp_path / "in" / "p.txt").write_text("a, b")
    code, out, err = run_cli("prep", "crop", tmp_path / "in", "--out", tmp_path / "out", "--mode", "focus",
                             "--size", "30")
    assert code == 0, err
    a = np.asarray(Image.open(tmp_path / "out" / "p.png"))
    b = np.asarray(Image.open(tmp_path / "out" / "p_after.png"))
    assert a.shape == b.shape == (30, 30, 3)
    report = json.loads((tmp_path / "out" / "crop_report.json").read_text())
    box = report["images"][0]["box"]
    assert box[0] <= 85 and box[2] >= 105  # the subject is inside
    assert (tmp_path / "out" / "p.txt").read_text() == "a, b"
    # same box for both: the crops differ only where the originals differ
    changed = np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 40
    ys, xs = np.nonzero(changed)
    assert changed.any() and xs.min() >= (90 - box[0]) // 2 - 1 and xs.max() <= (100 - box[0]) // 2 + 1


def test_crop_align_and_tag_carry_a_pairs_control_images(tmp_path, run_cli):
    """An edit pair's NAME_ref1.png, ... (data/dataset.py) go with the pair: cropped with its box and size, copied
    by --align, not tagged, and never an image or pair of their own; a gap in their numbering is refused."""
    rng = np.random.default_rng(0)
    before = (rng.random((60, 120, 3)) * 40 + 100).astype(np.uint8)
    before[20:40, 85:105] = (250, 30, 30)
    after = before.copy()
    after[25:35, 90:100] = (30, 30, 250)
    ref1 = 255 - before  # the same texture inverted: cropped by another box it would not invert the crop of before
    src = tmp_path / "in"
    _save(before, src / "p.png")
    _save(after, src / "p_after.png")
    _save(ref1, src / "p_ref1.png")
    _save(np.asarray(Image.fromarray(ref1).resize((60, 30), Image.LANCZOS)), src / "p_ref2.png")  # half size
    (src / "p.instruction.txt").write_text("make the square blue\n")
    code, out, err = run_cli("prep", "crop", src, "--out", tmp_path / "crop", "--mode", "focus", "--size", "30")
    assert code == 0, err
    report = json.loads((tmp_path / "crop" / "crop_report.json").read_text())["images"]
    assert [(r["image"], r["controls"]) for r in report] == [("p.png", ["p_ref1.png", "p_ref2.png"])]
    a = np.asarray(Image.open(tmp_path / "crop" / "p.png")).astype(int)
    for name in ("p_ref1.png", "p_ref2.png"):
        r = np.asarray(Image.open(tmp_path / "crop" / name)).astype(int)
        assert r.shape == a.shape == (30, 30, 3)
    assert np.abs(255 - np.asarray(Image.open(tmp_path / "crop" / "p_ref1.png")).astype(int) - a).mean() < 2
    assert (tmp_path / "crop" / "p.instruction.txt").read_text() == "make the square blue\n"

    code, out, err = run_cli("prep", "pairs", src, "--align", "--out", tmp_path / "al")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "al" / "p_ref2.png")),
                          np.asarray(Image.open(src / "p_ref2.png")))
    assert (tmp_path / "al" / "p_ref1.png").is_file() and (tmp_path / "al" / "p.instruction.txt").is_file()

    code, out, err = run_cli("prep", "tag", src, "--tagger", "toy")
    assert code == 0, err
    assert sorted(p.name for p in src.glob("*.txt")) == ["p.instruction.txt", "p.txt", "p_after.txt"]
    assert "2 control image(s) of pairs" in out

    (src / "p_ref1.png").unlink()  # p_ref2 alone: training refuses the pair, so does prep
    code, out, err = run_cli("prep", "crop", src, "--out", tmp_path / "gap", "--size", "30")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "skip p_ref1" in err
    assert not (tmp_path / "gap").exists()


def test_crop_upscaling_is_flagged_or_refused(tmp_path, run_cli):
    _save(np.full((64, 64, 3), 120, np.uint8), tmp_path / "in" / "small.png")
    _save(np.full((300, 200, 3), 120, np.uint8), tmp_path / "in" / "big.png")
    code, out, err = run_cli("prep", "crop", tmp_path / "in", "--out", tmp_path / "o1", "--mode", "center",
                             "--size", "128")
    assert code == 0, err
    rows = {r["image"]: r for r in json.loads((tmp_path / "o1" / "crop_report.json").read_text())["images"]}
    assert rows["small.png"]["flags"] == ["upscaled x2.00"] and rows["big.png"]["flags"] == []
    code, out, err = run_cli("prep", "crop", tmp_path / "in", "--out", tmp_path / "o2", "--size", "128",
                             "--bucket-no-upscale")
    assert code == 0, err
    assert (tmp_path / "o2" / "big.png").exists() and not (tmp_path / "o2" / "small.png").exists()
    assert "skipped" in {r["image"]: r for r in json.loads((tmp_path / "o2" / "crop_report.json").read_text())[
        "images"]}["small.png"]
    # with aspect buckets and no upscaling, kohya keeps a small image at its own size (steps of 64)
    code, out, err = run_cli("prep", "crop", tmp_path / "in", "--out", tmp_path / "o3", "--size", "512",
                             "--aspect-buckets", "--bucket-no-upscale")
    assert code == 0, err
    assert Image.open(tmp_path / "o3" / "small.png").size == (64, 64)
    assert Image.open(tmp_path / "o3" / "big.png").size == (192, 256)


def test_crop_larger_than_every_image_without_upscaling_is_refused(tmp_path, run_cli):
    _save(np.full((64, 64, 3), 120, np.uint8), tmp_path / "in" / "a.png")
    _save(np.full((80, 60, 3), 120, np.uint8), tmp_path / "in" / "b.png")
    code, out, err = run_cli("prep", "crop", tmp_path / "in", "--out", tmp_path / "out", "--size", "512",
                             "--bucket-no-upscale")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "b.png" in lines[0] and "512x512" in lines[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- pairs
def _shifted_photo_pair():
    import skimage.data

    big = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((256, 256), Image.LANCZOS))
    y0, x0 = 60, 60
    before = big[y0:y0 + 128, x0:x0 + 128].copy()
    after = big[y0 + 2:y0 + 130, x0 - 3:x0 + 125].copy()  # content moved 3 px right, 2 px up
    after[40:60, 50:80] = (255, 0, 0)  # the edit
    changed = np.zeros(before.shape[:2], bool)
    changed[40 - 2:60 + 4, 50 - 1:80 + 5] = True  # the edit's area on the "before" frame, 2 px margin
    return before, after, changed


def test_pairs_measures_shift_and_align_removes_it(tmp_path, run_cli):
    before, after, changed = _shifted_photo_pair()
    r = measure(before, after)
    assert abs(r.shift[0] - 3) <= 0.5 and abs(r.shift[1] + 2) <= 0.5
    assert "misaligned" in r.flags and r.scale == 1.0
    mad = lambda x: np.abs(x.astype(float) - before.astype(float))[~changed].mean() / 255  # noqa: E731
    assert mad(after) > 0.05
    assert mad(align(before, after, r)) < 0.01
    # the CLI: report, then aligned copies
    _save(before, tmp_path / "in" / "x.png")
    _save(after, tmp_path / "in" / "x_after.png")
    (tmp_path / "in" / "x_after.txt").write_text("red square")
    code, out, err = run_cli("prep", "pairs", tmp_path / "in", "--align", "--out", tmp_path / "al")
    assert code == 0, err
    assert "+3.00" in out and "-2.00" in out and "misaligned" in out
    aligned = np.asarray(Image.open(tmp_path / "al" / "x_after.png"))
    assert mad(aligned) < 0.01
    assert (tmp_path / "al" / "x_after.txt").read_text() == "red square"
    rep = json.loads((tmp_path / "al" / "pairs_report.json").read_text())["pairs"][0]
    assert rep["shift_x"] == pytest.approx(3, abs=0.5) and rep["shift_y"] == pytest.approx(-2, abs=0.5)
    # the aligned pair measures as aligned
    assert measure(before, aligned).flags == []


def test_pairs_subpixel_shift_and_scale():
    from difflora.data.alignment import warp

    before, _, _ = _shifted_photo_pair()
    for dx, dy in ((0.5, 0.25), (1.3, -0.7)):
        after = warp(before, (-dx, -dy))  # after(p) = before(p - d)
        r = measure(before, after)
        assert abs(r.shift[0] - dx) <= 0.25 and abs(r.shift[1] - dy) <= 0.25
    zoomed = warp(before, (0, 0), 1 / 1.06)
    r = measure(before, zoomed)
    assert abs(r.scale - 1.06) < 0.015 and "misaligned" in r.flags
    import skimage.data

    big = Image.fromarray(skimage.data.astronaut()).resize((256, 256))
    turned = np.asarray(big.rotate(3, resample=Image.BILINEAR))[64:192, 64:192]  # counter-clockwise
    straight = np.asarray(big)[64:192, 64:192]
    r = measure(straight, turned)
    assert abs(r.rotation - 3) <= 0.5 and "misaligned" in r.flags
    mad = lambda x: np.abs(x.astype(float) - straight)[10:-10, 10:-10].mean() / 255  # noqa: E731
    assert mad(align(straight, turned, r)) < 0.5 * mad(turned)


def test_pairs_flags_on_toy_pairs(tmp_path):
    """Every kind of toy pair (all 18 eval tasks: local edits, texture, and whole-face, hair and background
    recolourings, both ways), 8 pairs each: as rendered none is misaligned; with "after" shifted by
    (3, -2) px every one is measured at that shift within 0.5 px, and `align` leaves a mean absolute
    difference < 0.01 outside the edit (the style edit has no outside)."""
    from difflora.toy import faces
    from difflora.toy.evaluate import TASKS, write_pairs

    worst = {}
    for task in TASKS:
        write_pairs(tmp_path / task, task, 8, 0)
        for i in range(8):
            a = np.asarray(Image.open(tmp_path / task / f"{i:03d}.png").convert("RGB"))
            b = np.asarray(Image.open(tmp_path / task / f"{i:03d}_after.png").convert("RGB"))
            r = measure(a, b)
            assert "misaligned" not in r.flags and np.hypot(*r.shift) <= 0.25, (task, i, r)
            moved = shift_image(b, 3, -2)
            r = measure(a, moved)
            assert abs(r.shift[0] - 3) <= 0.5 and abs(r.shift[1] + 2) <= 0.5 and "misaligned" in r.flags, (task, i, r)
            outside = ~changed_mask(a, b, 0.0)  # every pixel the edit touched is inside
            if not task.startswith("style"):  # stripes and grain everywhere: no pixel is outside that edit
                mad = np.abs(align(a, moved, r).astype(float) - a)[outside].mean() / 255
                assert outside.mean() > 0.1 and mad < 0.01, (task, i, outside.mean(), mad)
            worst[task] = max(worst.get(task, 0.0), abs(r.shift[0] - 3), abs(r.shift[1] + 2))
    assert max(worst[t] for t in ("skin", "skin-rev", "background", "hair")) <= 0.1, worst  # recolourings: exact
    assert measure(a, a).flags == ["identical"]
    rng = np.random.default_rng(1)
    one = faces.render(dict(faces.sample_attributes(rng), background="green", style="flat"), 98)
    other = faces.render(dict(faces.sample_attributes(rng), background="blue", style="detailed"), 99)
    assert "differs almost everywhere" in measure(one, other).flags  # two photos, not an edit
    _, _, a, b = faces.make_pair(7, "eyes", "open", "closed")
    frac = changed_mask(a, b).mean()
    assert 0.005 < frac < 0.06  # the two eyes, not the face


# ---------------------------------------------------------------------------- taggers
TAGS = [("9999", "general", 9), ("9998", "sensitive", 9), ("1", "1girl", 0), ("2", "red_theme", 0),
        ("3", "blue_theme", 0), ("4", "hatsune_miku", 4)]


def _wd14_folder(folder: Path, nhwc: bool = True, tags=TAGS) -> Path:
    """A tiny ONNX model with WD14's signature: float input [batch, 448, 448, 3] (BGR, 0..255) ->
    sigmoid scores [batch, 6]. Scores: ratings general/sensitive from biases, 1girl 0.62, red_theme
    and blue_theme from the mean red minus blue, hatsune_miku 0.73."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    shape = ["batch", 448, 448, 3] if nhwc else ["batch", 3, 448, 448]
    w = np.zeros((3, 6), np.float32)
    w[2, 3], w[0, 3] = 1 / 20, -1 / 20  # BGR: channel 2 is red
    w[0, 4], w[2, 4] = 1 / 20, -1 / 20
    bias = np.array([2.0, 0.0, 0.5, 0.0, 0.0, 1.0], np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input_1:0", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", 6])],
        initializer=[numpy_helper.from_array(np.array([1, 2] if nhwc else [2, 3], np.int64), "axes"), numpy_helper.from_array(w, "w"),
                     numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["tag_id", "name", "category", "count"])
        for tag_id, name, cat in tags:
            wr.writerow([tag_id, name, cat, 100])
    return folder


def test_wd14_preprocessing_matches_the_reference():
    from difflora.prep.taggers import wd14_preprocess

    img = np.zeros((10, 20, 3), np.uint8)
    img[..., 0] = 200  # red
    x = wd14_preprocess(img, 20)
    assert x.dtype == np.float32 and x.shape == (20, 20, 3)
    assert (x[:5] == 255).all() and (x[15:] == 255).all()  # white padding, centred
    assert (x[5:15, :, 2] == 200).all() and (x[5:15, :, 0] == 0).all()  # BGR: red is the last channel


def test_wd14_tagger_cli(tmp_path, run_cli):
    model = _wd14_folder(tmp_path / "wd14")
    red = np.zeros((40, 60, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((40, 40, 3), np.uint8)
    blue[..., 2] = 255
    _save(red, tmp_path / "img" / "red.png")
    _save(blue, tmp_path / "img" / "blue.png")
    (tmp_path / "img" / "blue.txt").write_text("mine")
    code, out, err = run_cli("prep", "tag", tmp_path / "img", "--tagger", model)
    assert code == 0, err
    assert (tmp_path / "img" / "red.txt").read_text().strip() == "red theme, 1girl"
    assert (tmp_path / "img" / "blue.txt").read_text() == "mine"  # kept without --overwrite / --append
    code, out, err = run_cli("prep", "tag", tmp_path / "img", "--tagger", model, "--append",
                             "--character-threshold", "0.7", "--include-rating")
    assert code == 0, err
    assert (tmp_path / "img" / "blue.txt").read_text().strip() == "mine, hatsune miku, blue theme, 1girl, general"
    code, out, err = run_cli("prep", "tag", tmp_path / "img", "--tagger", model, "--overwrite", "--threshold", "0.9")
    assert code == 0, err
    assert (tmp_path / "img" / "red.txt").read_text().strip() == "red theme"


def test_wd14_bad_models_are_refused_before_writing(tmp_path, run_cli):
    _save(np.zeros((20, 20, 3), np.uint8), tmp_path / "img" / "a.png")
    nchw = _wd14_folder(tmp_path / "nchw", nhwc=False)
    code, out, err = run_cli("prep", "tag", tmp_path / "img", "--tagger", nchw)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(nchw / "model.onnx") in err and "not a WD14-style tagger" in err
    short = _wd14_folder(tmp_path / "short", tags=TAGS[:5])
    code, out, err = run_cli("prep", "tag", tmp_path / "img", "--tagger", short)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(short / "selected_tags.csv") in err and "5 tags" in err and "6 scores" in err
    assert not (tmp_path / "img" / "a.txt").exists()


def test_captioner_folder_tags_with_generated_text(tmp_path, run_cli):
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    torch.manual_seed(0)
    words = ["a", "face", "red", "blue", "hair", "photo", "of", "smiling"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=2, sep_token_id=3, pad_token_id=0,
                eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, projection_dim=32)).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=BertTokenizer(str(tmp_path / "vocab.txt")))
    folder = tmp_path / "blip"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    from difflora.toy import faces

    img = faces.render(faces.sample_attributes(np.random.default_rng(0)), 3)
    _save(img, tmp_path / "img" / "f.png")
    code, out, err = run_cli("prep", "tag", tmp_path / "img", "--tagger", folder)
    assert code == 0, err
    written = (tmp_path / "img" / "f.txt").read_text().strip()
    inputs = processor(images=Image.fromarray(img), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=40, num_beams=3, do_sample=False)
    expected = " ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split())
    assert written == expected and written
    assert set(written.split()) <= set(words)


def test_toy_tagger_agrees_with_the_judge(tmp_path, run_cli):
    from difflora.toy import faces
    from difflora.toy.judge import load_judge

    code, out, err = run_cli("toy", "dataset", "--n", "200", "--out", tmp_path / "ds", "--seed", "5")
    assert code == 0, err
    folder = tmp_path / "ds" / "1_face"
    truth = {p.stem: faces.parse_caption(p.read_text()) for p in folder.glob("*.txt")}
    for p in folder.glob("*.txt"):
        p.unlink()
    code, out, err = run_cli("prep", "tag", folder, "--tagger", "toy", "--batch-size", "64")
    assert code == 0, err
    images = sorted(folder.glob("*.png"))
    judged = load_judge().predict([np.asarray(Image.open(p).convert("RGB")) for p in images])
    tagged = [faces.parse_caption((p.with_suffix(".txt")).read_text()) for p in images]
    assert len(tagged) == 200
    assert sum(t == j for t, j in zip(tagged, judged)) == 200
    assert sum(t == truth[p.stem] for t, p in zip(tagged, images)) == 200


# ---------------------------------------------------------------------------- captions
def test_captions_edits_and_reports(tmp_path, run_cli):
    d = tmp_path / "d"
    d.mkdir()
    caps = {"a": "a face, red hair, eyes open, red hair", "a_after": "a face, red hair, eyes closed",
            "b": "a face, blonde_hair, eyes open, smiling", "b_after": "a face, blonde hair, eyes closed, smiling"}
    for name, cap in caps.items():
        _save(np.zeros((8, 8, 3), np.uint8), d / f"{name}.png")
        (d / f"{name}.txt").write_text(cap + "\n")
    code, out, err = run_cli("prep", "captions", d, "--trigger", "zkw", "--remove", "a face", "--replace",
                             "blonde hair=yellow hair", "--sort")
    assert code == 0, err
    read = {n: (d / f"{n}.txt").read_text().strip() for n in caps}
    # eyes open/closed: 2 captions each; red/yellow hair 2 each; smiling 2 — ties keep the caption's order
    assert read["a"] == "zkw, red hair, eyes open"
    assert read["a_after"] == "zkw, red hair, eyes closed"
    assert read["b"] == "zkw, yellow hair, eyes open, smiling"
    assert "a.png: eyes open -> eyes closed" in out
    rep = json.loads((d / "captions_report.json").read_text())
    assert rep["frequency"]["zkw"] == 4 and rep["frequency"]["eyes closed"] == 2
    assert rep["pairs"][1] == {"pair": "b.png", "shared": ["zkw", "yellow hair", "smiling"],
                               "before_only": ["eyes open"], "after_only": ["eyes closed"]}
    # a dry run changes nothing
    before = {n: (d / f"{n}.txt").read_text() for n in caps}
    code, out, err = run_cli("prep", "captions", d, "--trigger", "other", "--dry-run")
    assert code == 0 and "would change 4 of 4" in out
    assert before == {n: (d / f"{n}.txt").read_text() for n in caps}


def shift_image(arr: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Content moved dx right, dy down; the uncovered border repeats the edge pixels."""
    h, w = arr.shape[:2]
    p = np.pad(arr, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    return p[abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w].copy()


def test_training_warns_about_a_misaligned_pair(tmp_path, tiny_sd1_dir, run_cli, caplog):
    import logging

    from conftest import _write_pairs, write_job

    pairs = tmp_path / "pairs"
    _write_pairs(pairs, 2, 32)
    moved = shift_image(np.asarray(Image.open(pairs / "001_after.png").convert("RGB")), 3, -2)
    Image.fromarray(moved).save(pairs / "001_after.png")
    job = write_job(tmp_path / "job.toml", (
        f'model = "{tiny_sd1_dir}"\nmethod = "addift"\nresolution = 32\nmax_train_steps = 1\n'
        f'output_dir = "{tmp_path / "out"}"\nlog_with = "none"\n'
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{pairs}"\ncaption_extension = ".txt"\n'))
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli("train", job)
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if "relative to 'before'" in r.getMessage()]
    assert len(warned) == 1 and "001_after.png" in warned[0] and "(+3.0, -2.0)" in warned[0]
