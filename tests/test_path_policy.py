"""One path policy for `train --restrict-paths` and the UI (pathpolicy.py), over every path-typed job key."""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path

import pytest
import tomli_w
from pydantic import BaseModel

from difflora.config import DatasetFile, JobConfig, load_job
from difflora.errors import UserError
from difflora.options import field_path_role, path_keys
from difflora.pathpolicy import PathPolicy

# Every string-valued key of the schema that names no file or folder. A key added later (by a
# family, a method, an adapter) must be declared a path (options.ReadPath / WritePath) or listed here.
NOT_PATHS = {"keep_tokens_separator", "caption_separator", "caption_prefix", "caption_suffix", "caption_extension",
             "class_tokens", "after_suffix", "network_only_if_contains", "network_ignore_if_contains", "network_module",
             "network_args", "network_algo", "optimizer_args", "output_name", "training_comment", "sample_sampler",
             "edit_instruction", "prompt"}


def _tables(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for a in typing.get_args(annotation) for t in _tables(a)]


def _holds_text(annotation) -> bool:
    return annotation is str or any(_holds_text(a) for a in typing.get_args(annotation))


def _string_keys(table: type[BaseModel], prefix: str = "") -> dict[str, object]:
    out = {}
    for name, field in table.model_fields.items():
        subs = _tables(field.annotation)
        if subs:
            for sub in subs:
                out.update(_string_keys(sub, f"{prefix}{name}."))
        elif _holds_text(field.annotation):
            out[prefix + name] = field
    return out


def test_every_string_key_is_a_path_or_declared_not_one():
    for schema in (JobConfig, DatasetFile):
        for key, field in _string_keys(schema).items():
            leaf = key.rsplit(".", 1)[-1]
            assert field_path_role(field) is not None or leaf in NOT_PATHS, (
                f"{key}: mark it ReadPath/WritePath (options.py) if it names a file or folder, else add it to NOT_PATHS")
    keys = dict(path_keys(JobConfig))
    # the ones a reviewer would look for, FLUX's component files among them
    for key in ("model", "network_weights", "preset_loras.path", "sample_prompts", "validation_data_dir",
                "dataset_config", "datasets.subsets.image_dir", "datasets.subsets.after_dir", "clip_l", "t5xxl", "ae",
                "t5xxl_tokenizer"):
        assert keys[key] == "read", key
    assert keys["output_dir"] == keys["logging_dir"] == "write"


def _fill(table: type[BaseModel], inside: str) -> dict:
    """The required keys of a table: inside paths, one nested table where a list of tables is required."""
    out = {}
    for name, field in table.model_fields.items():
        if not field.is_required():
            continue
        subs = _tables(field.annotation)
        out[name] = [_fill(subs[0], inside)] if subs else inside
    return out


def _job_with(key: str, value: str, schema: type[BaseModel], inside: str) -> dict:
    """A job (or dataset file) whose `key` (dotted, nested tables created) is `value`."""
    data = {"train_data_dir": inside} if schema is JobConfig else {}
    node, table = data, schema
    *parents, leaf = key.split(".")
    for part in parents:
        table = _tables(table.model_fields[part].annotation)[0]
        if part not in node:
            node[part] = [_fill(table, inside)]
        node = node[part][0]
    node[leaf] = value
    return data


def _cases():
    for schema in (JobConfig, DatasetFile):
        for key, role in path_keys(schema):
            yield pytest.param(schema, key, role, id=f"{schema.__name__}:{key}")


@pytest.mark.parametrize("schema,key,role", list(_cases()))
def test_every_path_key_is_checked(tmp_path, schema, key, role):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    (outside / "file.safetensors").write_bytes(b"x")
    inside = str(root / "data")
    target = {"read": str(outside / "file.safetensors"), "write": str(outside)}[role]
    for value in (target, "../outside/file.safetensors", "~/../../" + target.lstrip("/")):
        data = _job_with(key, value, schema, inside)
        if schema is DatasetFile:
            (root / "ds.toml").write_text(tomli_w.dumps(data))
            data = {"dataset_config": "ds.toml"}
        (root / "job.toml").write_text(tomli_w.dumps(data))
        with pytest.raises(UserError, match="outside the allowed folder") as e:
            load_job(root / "job.toml", restrict_paths_to=root)
        assert key.rsplit(".", 1)[-1] in str(e.value)
    # a symlink inside the folder that leads outside is refused the same way
    (root / "link").symlink_to(outside if role == "write" else outside / "file.safetensors")
    data = _job_with(key, "link", schema, inside)
    if schema is DatasetFile:
        (root / "ds.toml").write_text(tomli_w.dumps(data))
        data = {"dataset_config": "ds.toml"}
    (root / "job.toml").write_text(tomli_w.dumps(data))
    with pytest.raises(UserError, match="outside the allowed folder"):
        load_job(root / "job.toml", restrict_paths_to=root)
    # --allow-path trusts a folder for inputs, never for outputs
    if role == "read":
        try:
            load_job(root / "job.toml", restrict_paths_to=PathPolicy(root, [outside]))
        except UserError as e:  # past the policy: a file that is no TOML, say
            assert "outside the allowed folder" not in str(e)
    else:
        with pytest.raises(UserError, match="outside the allowed folder"):
            load_job(root / "job.toml", restrict_paths_to=PathPolicy(root, [outside]))


def test_symlinks_inside_pair_and_model_folders_are_followed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    pairs = root / "pairs"
    pairs.mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (outside / "secret.txt").write_text("x")
    job = root / "job.toml"
    job.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "pairs"\n')
    load_job(job, restrict_paths_to=root)
    (pairs / "001.txt").symlink_to(outside / "secret.txt")  # a caption leading outside
    with pytest.raises(UserError, match="image_dir.*001.txt, a symlink to .*outside the allowed folder"):
        load_job(job, restrict_paths_to=root)
    (pairs / "001.txt").unlink()
    (pairs / "sub").mkdir()
    (pairs / "sub" / "001_after.png").symlink_to(outside / "secret.png")
    with pytest.raises(UserError, match="001_after.png, a symlink to"):
        load_job(job, restrict_paths_to=root)
    load_job(job, restrict_paths_to=PathPolicy(root, [outside]))  # trusted

    model = root / "model"
    (model / "unet").mkdir(parents=True)
    index = model / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "diffusion_pytorch_model-00001.safetensors"}}))
    (pairs / "sub" / "001_after.png").unlink()
    job.write_text(f'model = "model"\n' + job.read_text())
    load_job(job, restrict_paths_to=root)
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "../../../outside/secret.png"}}))
    with pytest.raises(UserError, match="weights index .* naming '../../../outside/secret.png'"):
        load_job(job, restrict_paths_to=root)
    index.write_text("[1, 2")
    with pytest.raises(UserError, match="not a readable weights index"):
        load_job(job, restrict_paths_to=root)


def test_relative_component_paths_resolve_from_the_job_file(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "job.toml").write_text('train_data_dir = "data"\nclip_l = "enc/clip_l.safetensors"\n'
                                   't5xxl_tokenizer = "tok"\n')
    monkeypatch.chdir(tmp_path)
    job = load_job(Path("jobs/job.toml"))
    assert job.clip_l == str(jobs / "enc" / "clip_l.safetensors")
    assert job.t5xxl_tokenizer == str(jobs / "tok")


def test_train_allow_path_needs_restrict_paths(tmp_path, run_cli):
    job = tmp_path / "job.toml"
    job.write_text('train_data_dir = "data"\n')
    code, _, err = run_cli("train", job, "--allow-path", tmp_path)
    assert code == 2 and "--allow-path goes with --restrict-paths" in err
    (tmp_path / "ws").mkdir()
    code, _, err = run_cli("train", job, "--restrict-paths", tmp_path / "ws")
    assert code == 2 and "outside the allowed folder" in err and len(err.strip().splitlines()) == 1


def test_sample_prompt_control_images_are_checked(tmp_path):
    """A prompt line's `--ci FILE` is an image the run reads: outside the folder it is refused like a path key."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (root / "before.png").write_bytes(b"x")
    (root / "job.toml").write_text('train_data_dir = "data"\nsample_prompts = "prompts.txt"\nsample_at_first = true\n')
    (root / "prompts.txt").write_text("close the eyes --ci before.png\n")
    load_job(root / "job.toml", restrict_paths_to=root)
    for named in ("../outside/secret.png", str(outside / "secret.png")):
        (root / "prompts.txt").write_text(f"close the eyes --ci before.png\nopen them --ci {named}\n")
        with pytest.raises(UserError, match="sample_prompts --ci.*outside the allowed folder"):
            load_job(root / "job.toml", restrict_paths_to=root)
    load_job(root / "job.toml", restrict_paths_to=PathPolicy(root, [outside]))  # trusted
