"""End to end in headless Chromium, against one `difflora ui` server per module.

The form's refusals, paths, uploads, presets, import and the Pairs page's captions and instructions
first (no training); then one run of the demo job through every page: live curve, stop, resume, a server
restart and a second resume, a reload and a second tab mid-run, sample now (the LoRA equal to an
uninterrupted training of the same job), whole sample grids, the log's end, Runs with continue, Compare,
Tools. Both tests share the server: each server start and each training start costs seconds on CI.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from .conftest import Server

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parents[2] / "docs"
STEPS = 40  # the demo job: ADDifT's defaults on four toy pairs


def write_toy_pairs(folder: Path, n: int = 4) -> list[Path]:
    from difflora.toy.evaluate import write_pairs

    write_pairs(folder, "eyes", n, seed=0)
    return sorted(folder.iterdir())


def fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def value_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a Gradio dropdown as a user does: open its list, click the option."""
    box = page.locator(f"#{elem_id} input").first
    if box.get_attribute("aria-expanded") != "true":
        # Gradio opens the list when the box gains focus: a box still focused after Escape closed its list
        # stays closed when clicked again (a user clicks elsewhere first)
        box.evaluate("input => input.blur()")
        box.click()
    page.get_by_role("option", name=option, exact=True).click()


def text_of(page, selector: str) -> str:
    return page.locator(selector).first.inner_text()


def wait_text(page, selector: str, predicate, timeout_s: float = 240, what: str = "") -> str:
    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        try:
            last = text_of(page, selector)
        except Exception:  # the element is being re-rendered
            last = ""
        if predicate(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or selector}; last text: {last!r}")


def wait_state(page, states: tuple[str, ...], timeout_s: float = 600) -> str:
    return wait_text(page, "#live-state", lambda t: t in states, timeout_s, f"run state in {states}")


def events_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def wait_for_a_step_of_stage(run: Path, stage: int, timeout_s: float = 300) -> None:
    """Until the run's `stage`-th start (1: the first, 2: the first resume, ...) has logged a step."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        types = [e["type"] for e in events_of(run)]
        starts = [i for i, t in enumerate(types) if t == "stage_started"]
        if len(starts) >= stage and "step" in types[starts[stage - 1]:]:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step of start {stage} in {timeout_s} s: {types[-5:]}")


def only_run(workspace: Path) -> Path:
    runs = [p for p in (workspace / "runs").iterdir() if (p / "run.json").is_file()]
    assert len(runs) == 1, runs
    return runs[0]


def image_box(page, selector: str) -> dict:
    """The image's own size and the size it is drawn at, and how it fits its box."""
    return page.locator(selector).first.evaluate(
        """img => { const r = img.getBoundingClientRect(); const s = getComputedStyle(img);
                    return {natural_w: img.naturalWidth, natural_h: img.naturalHeight, w: r.width, h: r.height,
                            fit: s.objectFit}; }""")


# Times a click on Start to the first "Not started" in the status line, from the page's own events (no polling).
WATCH_START = """() => { window.__refusal = {};
  document.querySelector('#train-start').addEventListener('click',
      () => { window.__refusal = {click: performance.now()}; }, true);
  const status = document.querySelector('#train-status');
  new MutationObserver(() => { const r = window.__refusal;
      if (r.click && !r.shown && status.innerText.includes('Not started')) r.shown = performance.now(); })
    .observe(status, {subtree: true, childList: true, characterData: true}); }"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A workspace with two pair folders (good and identical) and its server, for the whole module."""
    root = tmp_path_factory.mktemp("ui")
    ws = root / "ws"
    write_toy_pairs(ws / "pairs" / "eyes", 2)
    same = ws / "pairs" / "same"
    same.mkdir(parents=True)
    shutil.copyfile(ws / "pairs" / "eyes" / "000.png", same / "000.png")
    shutil.copyfile(ws / "pairs" / "eyes" / "000.png", same / "000_after.png")
    servers = [Server(ws, root / "server0.log").start()]
    yield ws, root, servers
    for s in servers:
        s.stop()


def test_refusals_paths_uploads_presets_import_and_pair_instructions(shared, page, screenshots):
    ws, root, servers = shared
    server = servers[-1]
    (root / "secret.txt").write_text("outside")
    page.goto(server.url)
    tab(page, "Train")
    page.evaluate(WATCH_START)

    # Start with a missing folder or an identical pair: refused next to the field within 2 s (read from the page's
    # own events), nothing queued
    timings = []
    for folder, expected in [("pairs/missing", "image_dir: pairs/missing: image folder not found"),
                             ("pairs/same", "is two identical images")]:
        fill(page, "f-image_dir", folder)
        page.wait_for_timeout(1000)  # the live check of the form settles
        page.locator("#train-start").click()
        page.wait_for_function("() => window.__refusal.shown", timeout=30_000)
        times = page.evaluate("() => window.__refusal")
        timings.append((times["shown"] - times["click"]) / 1000)
        status = text_of(page, "#train-status")
        assert expected in status and expected in text_of(page, "#err-Data"), status
        print(f"\n{folder}: refused on the page {timings[-1]:.2f} s after the click "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    page.screenshot(path=str(screenshots / "train_refused.png"), full_page=True)
    assert max(timings) <= 2.0, (timings, os.getloadavg()[0])

    # a preset saved from the form comes back after the form changed; a kohya config imported into the form
    fill(page, "f-learning_rate", "0.002")
    page.locator("#g-presets").get_by_text("presets and import").first.click()
    fill(page, "preset-pick", "my eyes")
    page.keyboard.press("Enter")
    page.locator("#preset-save").click()
    wait_text(page, "#train-status", lambda t: "Saved the preset" in t, 120, "the preset")
    assert "learning_rate = \"0.002\"" in (ws / "presets" / "my_eyes.toml").read_text()
    (ws / "jobs").mkdir(exist_ok=True)
    (ws / "jobs" / "kohya.toml").write_text(
        'learning_rate = 3e-4\nmax_train_steps = 120\nxformers = true\nmethod = "addift"\n'
        '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "../pairs/eyes"\n')
    fill(page, "import-path", "jobs/kohya.toml")
    page.locator("#import-go").click()
    # the import fills the form, whose live check may then replace "Imported ..." with "Ready to start."
    status = wait_text(page, "#train-status", lambda t: "Imported" in t or "Not imported" in t
                       or value_of(page, "f-learning_rate") == "0.0003", 120, "the import")
    assert "Not imported" not in status, status
    assert (value_of(page, "f-learning_rate"), value_of(page, "f-max_train_steps")) == ("0.0003", "120")
    assert value_of(page, "f-image_dir") == "pairs/eyes" and value_of(page, "f-method") == "addift"
    page.locator("#preset-load").click()
    wait_text(page, "#train-status", lambda t: "Loaded the preset" in t, 120, "the preset")
    assert (value_of(page, "f-learning_rate"), value_of(page, "f-max_train_steps")) == ("0.002", "")
    assert value_of(page, "f-image_dir") == "pairs/same"  # the form as it was saved
    page.screenshot(path=str(screenshots / "train_presets.png"), full_page=True)

    # an invalid value: the CLI's message, inline in its group, in the field's words; Start starts nothing
    fill(page, "f-image_dir", "pairs/eyes")
    fill(page, "f-learning_rate", "-1")
    err = wait_text(page, "#err-Optimisation", lambda t: "learning_rate" in t, 30, "the inline error")
    assert "learning_rate: Input should be greater than 0" in err  # the field's name, not the job file's line
    page.screenshot(path=str(screenshots / "train_error.png"), full_page=True)
    page.locator("#train-start").click()
    assert "learning_rate" in wait_text(page, "#train-status", lambda t: "Not started" in t and "rate" in t, 30)
    fill(page, "f-learning_rate", "")

    # a path outside the workspace, in the form and on the Pairs page; no endpoint serves a file outside it
    fill(page, "f-image_dir", "../")
    assert "outside the allowed folder" in wait_text(page, "#err-Data", lambda t: "outside" in t, 30, "the error")
    page.locator("#train-start").click()
    wait_text(page, "#train-status", lambda t: "Not started" in t and "outside" in t, 30)
    assert not (ws / "runs").exists() or list((ws / "runs").iterdir()) == []  # nothing queued

    def served(path: Path) -> int:
        try:
            with urllib.request.urlopen(f"{server.url}gradio_api/file={path}") as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert served(root / "secret.txt") == 403 and served(Path("/etc/passwd")) == 403
    assert served(ws / "pairs" / "eyes" / "000.png") == 200

    # every field says what it is; only the chosen method's table is on the page; the family selector
    assert "learning rate" in page.locator("#f-learning_rate").inner_text()
    assert page.locator("#g-addift-options").is_visible() and not page.locator("#g-copier-options").is_visible()
    choose(page, "f-method", "copier")
    page.wait_for_function("() => document.querySelector('#g-copier-options') && "
                           "document.querySelector('#g-copier-options').offsetParent !== null", timeout=30_000)
    assert not page.locator("#g-addift-options").is_visible()
    assert page.locator("#g-FLUX-1-models").is_visible()  # every family's keys while the family is detected
    choose(page, "f-model_family", "sd1")
    page.wait_for_function("() => document.querySelector('#g-FLUX-1-models') === null || "
                           "document.querySelector('#g-FLUX-1-models').offsetParent === null", timeout=30_000)
    choose(page, "f-model_family", "flux")
    page.wait_for_function("() => document.querySelector('#g-FLUX-1-models') && "
                           "document.querySelector('#g-FLUX-1-models').offsetParent !== null", timeout=30_000)
    assert "t5xxl" in page.locator("#g-FLUX-1-models").inner_text()
    page.screenshot(path=str(screenshots / "train_flux.png"), full_page=True)

    # a refused upload (one image of the batch cut short) leaves the pair folder byte-identical
    def snapshot(folder: Path) -> dict:
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    before = snapshot(ws / "pairs" / "eyes")
    good, broken = root / "new.png", root / "new_after.png"
    shutil.copyfile(ws / "pairs" / "eyes" / "000.png", good)
    broken.write_bytes((ws / "pairs" / "eyes" / "000_after.png").read_bytes()[:80])
    tab(page, "Pairs")
    fill(page, "pairs-new-name", "eyes")
    page.locator("#pairs-upload input[type=file]").set_input_files([str(good), str(broken)])
    page.locator("#pairs-add").click()
    status = wait_text(page, "#pairs-status", lambda t: "Refused" in t or "Added" in t, 60, "the upload")
    assert "Refused" in status and "new_after.png" in status and "nothing was added" in status, status
    assert snapshot(ws / "pairs" / "eyes") == before

    # the Pairs page: a folder outside is refused; a pair's captions and its edit instruction are saved
    page.locator("#pairs-folder input").first.fill(str(root))
    page.keyboard.press("Enter")
    page.locator("#pairs-show").click()
    assert "outside the allowed folder" in wait_text(page, "#pairs-status", lambda t: "outside" in t, 60)
    page.locator("#pairs-folder input").first.fill("pairs/eyes")
    page.keyboard.press("Enter")
    page.locator("#pairs-show").click()
    wait_text(page, "#pairs-status", lambda t: "2 pair(s)" in t, 60, "the pairs")
    page.wait_for_function("() => document.querySelector('#pairs-caption-before textarea').value !== ''",
                           timeout=30_000)  # the first pair is picked: its captions are loaded
    caption = (ws / "pairs" / "eyes" / "000.txt").read_text().strip()
    assert value_of(page, "pairs-caption-before") == caption and value_of(page, "pairs-instruction") == ""
    fill(page, "pairs-instruction", " close the eyes ")
    page.locator("#pairs-save").click()
    wait_text(page, "#pairs-saved", lambda t: "Saved" in t, 30, "the save")
    assert (ws / "pairs" / "eyes" / "000.instruction.txt").read_text() == "close the eyes\n"
    assert (ws / "pairs" / "eyes" / "000.txt").read_text().strip() == caption  # the captions as they were
    page.locator("#pairs-show").click()
    wait_text(page, "#pairs-gallery", lambda t: "edit: close the eyes" in t, 60, "the instruction in the gallery")
    page.screenshot(path=str(screenshots / "pairs_instruction.png"), full_page=True)
    assert not (ws / "runs").exists() or list((ws / "runs").iterdir()) == []  # nothing queued on this page


def reference_lora(run: Path, out: Path) -> dict:
    """The run's own job trained here without interruption (without its samples), into `out`."""
    import tomllib

    import tomli_w

    from difflora.config import load_job
    from difflora.train.loop import train

    job = tomllib.loads((run / "job.toml").read_text())
    out.parent.mkdir(parents=True)
    job["output_dir"] = str(out)
    for key in ("sample_prompts", "sample_sweep", "sample_every_n_steps"):  # samples draw their own noise
        job.pop(key, None)
    (out.parent / "job.toml").write_text(tomli_w.dumps(job))
    train(load_job(out.parent / "job.toml"))
    return load_lora(out / "last.safetensors")


def load_lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_one_run_through_every_page(shared, page, browser, screenshots, tmp_path):
    ws, root, servers = shared
    uploads = write_toy_pairs(tmp_path / "to_upload")  # outside the workspace, as a user's own files
    page.goto(servers[-1].url)

    # Pairs: four pairs uploaded into a new folder, each with its heat map and mask, no warning
    tab(page, "Pairs")
    fill(page, "pairs-new-name", "four")
    page.locator("#pairs-upload input[type=file]").set_input_files([str(p) for p in uploads])
    page.locator("#pairs-add").click()
    status = wait_text(page, "#pairs-status", lambda t: "pair(s)" in t or "Refused" in t, 60, "the upload")
    assert "Added 16 file(s)" in status and "4 pair(s)" in status and "No warnings" in status, status
    assert page.locator("#pairs-gallery img").count() == 4
    assert sorted(p.name for p in (ws / "pairs" / "four").iterdir()) == sorted(p.name for p in uploads)
    page.screenshot(path=str(screenshots / "pairs.png"), full_page=True)

    # Train: the demo job; the live loss curve
    tab(page, "Train")
    fill(page, "f-image_dir", "pairs/four")
    wait_text(page, "#train-status", lambda t: "Ready to start" in t, 60, "the form to validate")
    t0 = time.time()
    page.locator("#train-start").click()
    wait_text(page, "#live-points", lambda t: t.strip() not in ("", "0"), 300, "the first loss point")
    print(f"\nstart -> first loss point: {time.time() - t0:.1f} s")
    assert page.locator("#live-loss canvas, #live-loss svg").count() > 0  # the curve is drawn
    run = only_run(ws)

    # Stop: the run saves its state; a requested stop is not logged as an error
    page.locator("#live-stop").click()
    wait_state(page, ("stopped",))
    stopped_at = sum(e["type"] == "step" for e in events_of(run))
    assert 0 < stopped_at < STEPS, stopped_at
    log = (run / "log.txt").read_text()
    assert "difflora: stopped at step" in log and "error" not in log.lower()

    # Resume, then the server stops during the resumed run: interrupted, and a new server resumes it
    page.locator("#live-resume").click()
    wait_state(page, ("running",), 60)
    wait_for_a_step_of_stage(run, 2)
    assert servers[-1].stop() == 0
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    servers.append(Server(ws, root / f"server{len(servers)}.log").start())
    page.goto(servers[-1].url)
    tab(page, "Live run")
    wait_state(page, ("interrupted",), 30)
    page.locator("#live-resume").click()
    wait_state(page, ("running",), 60)
    wait_for_a_step_of_stage(run, 3)

    # a reload, and a second tab opened now: both show the running run at its current step
    page.reload()
    other = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    other.goto(servers[-1].url)
    for pg in (page, other):
        tab(pg, "Live run")
        summary = wait_text(pg, "#live-summary", lambda t: run.name in t and "running" in t, 30, "the running run")
        step = int(text_of(pg, "#live-step"))
        assert 0 < step <= max(e.get("global_step", 0) for e in events_of(run)), summary
    tab(other, "Runs")
    wait_text(other, "#runs-table", lambda t: run.name in t and "running" in t, 30, "the run in the table")
    other.context.close()

    # "sample now": a grid at the current step, besides the finished LoRA's
    page.locator("#live-sample-now").click()
    wait_text(page, "#live-message", lambda t: "Sampling" in t or "Refused" in t, 30, "the request")
    assert "Sampling after this step" in text_of(page, "#live-message")
    step_at_request = max(e.get("global_step", 0) for e in events_of(run))
    wait_state(page, ("finished",))
    events = events_of(run)
    starts = [e["start_step"] for e in events if e["type"] == "stage_started"]
    ends = [e["step"] for e in events if e["type"] == "stopped"]
    assert starts[1:] == ends and 0 < ends[0] < ends[1] < STEPS, (starts, ends)
    assert sum(e["type"] == "step" for e in events) == STEPS and events[-1]["type"] == "finished"
    # on request, then the end once; a request that reaches the run during its last step is that final grid
    # (never two grids at one step): on a loaded machine the click can come that late
    sampled = [e["step"] for e in events if e["type"] == "sample_written"]
    if step_at_request < STEPS - 1:
        assert len(sampled) == 2 and step_at_request <= sampled[0] < STEPS and sampled[1] == STEPS, sampled
    else:
        assert sampled == [STEPS], sampled

    # the finished LoRA's grid: whole (drawn at its own aspect, nothing cut) and at least 256 px tall
    wait_text(page, "#live-samples", lambda t: f"step {STEPS}" in t, 30, "the final sample grid")
    page.wait_for_timeout(1000)
    box = image_box(page, "#live-latest img")
    assert box["h"] >= 256, box
    assert abs(box["w"] / box["h"] - box["natural_w"] / box["natural_h"]) < 0.02, box  # the aspect kept
    assert box["fit"] in ("contain", "fill", "scale-down", "none", ""), box
    # the log tail ends with the log's last line, scrolled to its end
    log_lines = [line.rsplit("\r", 1)[-1] for line in (run / "log.txt").read_text().splitlines() if line.strip()]
    shown = page.locator("#live-log textarea").first.input_value().splitlines()
    assert shown[-1] == log_lines[-1], (shown[-3:], log_lines[-3:])
    assert page.locator("#live-log textarea").first.evaluate(
        "t => t.scrollTop + t.clientHeight >= t.scrollHeight - 2")
    page.screenshot(path=str(screenshots / "live.png"), full_page=True)

    # stopped twice and resumed twice, the LoRA is the uninterrupted training's
    lora = run / "output" / "last.safetensors"
    resumed, reference = load_lora(lora), reference_lora(run, tmp_path / "reference" / "output")
    assert resumed.keys() == reference.keys()
    for k in resumed:
        torch.testing.assert_close(resumed[k], reference[k], rtol=0, atol=1e-6, msg=k)
    assert any(float(v.abs().max()) > 0 for k, v in resumed.items() if "lora_up" in k)  # it learned something

    # Runs: listed finished after a reload, with its job; "continue" fills the form from its LoRA
    page.reload()
    tab(page, "Runs")
    wait_text(page, "#runs-table", lambda t: run.name in t and "finished" in t, 30, "the run in the table")
    choose(page, "runs-pick", run.name)
    wait_text(page, "#runs-details", lambda t: run.name in t and "finished" in t, 30, "the run's details")
    assert "addift" in text_of(page, "#runs-job")
    page.screenshot(path=str(screenshots / "runs.png"), full_page=True)
    fill(page, "runs-more-steps", "10")
    page.locator("#runs-continue").click()
    wait_text(page, "#train-status", lambda t: "Ready to start" in t, 60, "the continued job to validate")
    rel = lora.relative_to(ws).as_posix()
    assert value_of(page, "f-image_dir") == "pairs/four"
    page.locator("#train-as-toml").click()  # network_weights is folded (not on the page): the form's job shows it
    job = wait_text(page, "#train-copy", lambda t: "network_weights" in t, 60, "the continued job")
    assert f'network_weights = "{lora}"' in job and "max_train_steps = 10" in job, job

    # Compare: the LoRA at -1/0/+1 from the base model, picked by run and name
    tab(page, "Compare")
    choose(page, "cmp-loras", f"last · run {run.name}")
    page.keyboard.press("Escape")
    fill(page, "cmp-n", "1")
    fill(page, "cmp-steps", "4")
    page.locator("#cmp-go").click()
    assert "1 grid(s)" in wait_text(page, "#cmp-message", lambda t: "grid(s)" in t or "Refused" in t, 400, "compare")
    assert Image.open(next((ws / "compare").rglob("000_grid.png"))).size[0] >= 3 * 64  # three weights side by side
    page.screenshot(path=str(screenshots / "compare.png"), full_page=True)

    # Tools: a resize above the file's rank says the rank written; its output is not replaced unconfirmed;
    # a merge that cancels out says so
    tab(page, "Tools")
    page.get_by_role("tab", name="Resize", exact=True).click()
    fill(page, "tool-resize-lora", rel)
    page.keyboard.press("Enter")
    fill(page, "tool-resize-rank", "8")
    page.locator("#tool-resize-go").click()
    out = wait_text(page, "#tool-resize-out", lambda t: "Warning" in t or "Refused" in t, 120, "the resize")
    assert "the file's rank is 4: asking for 8 wrote rank 4" in out, out
    page.locator("#tool-resize-go").click()
    out = wait_text(page, "#tool-resize-out", lambda t: "Refused" in t, 60, "the second resize")
    assert "tools/resized.safetensors exists; tick 'overwrite'" in out, out
    page.screenshot(path=str(screenshots / "tools.png"), full_page=True)
    (ws / "loras").mkdir()
    shutil.copyfile(lora, ws / "loras" / "copy.safetensors")  # after the page was built: its picker learns it
    page.get_by_role("tab", name="Merge", exact=True).click()
    choose(page, "tool-merge-loras", f"last · run {run.name}")
    choose(page, "tool-merge-loras", "loras/copy.safetensors")
    page.keyboard.press("Escape")
    fill(page, "tool-merge-ratios", "1 -1")
    page.locator("#tool-merge-go").click()
    out = wait_text(page, "#tool-merge-out", lambda t: "Warning" in t or "Refused" in t, 120, "the merge")
    assert "the merged LoRA is zero everywhere" in out, out

    tab(page, "Evaluate")
    page.wait_for_timeout(500)
    page.screenshot(path=str(screenshots / "evaluate.png"), full_page=True)
    tab(page, "Train")
    page.wait_for_timeout(500)
    page.screenshot(path=str(screenshots / "train.png"), full_page=True)
    if os.environ.get("DIFFLORA_UI_DOCS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(screenshots / "pairs.png", DOCS / "ui-pairs.png")
        shutil.copyfile(screenshots / "live.png", DOCS / "ui-live.png")
