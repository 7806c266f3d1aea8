"""Loading models from s3:// (real S3 over HTTP on loopback): options reach fsspec, changed files refetch."""

from __future__ import annotations

import json

import pytest
import torch

import core.modeling
from core.config import ModelConfig
from core.modeling import load_model, load_tokenizer, resolve_source


@pytest.fixture
def remote_model(moto_s3, small_model_dir, tmp_path, monkeypatch):
    """small_model_dir uploaded to s3://<bucket>/m; the cache in tmp_path; creds only in the env."""
    import s3fs

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(**moto_s3.storage_options, skip_instance_cache=True)
    for f in sorted(small_model_dir.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{moto_s3.bucket}/m/{f.relative_to(small_model_dir)}")
    options = {"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}}  # key/secret from AWS_* env
    return fs, f"s3://{moto_s3.bucket}/m", options


def _cached(tmp_path):
    root = tmp_path / "cache" / "remote-models"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_s3_model_loads_with_storage_options_and_matches_local(remote_model, small_model_dir, tmp_path):
    _, uri, options = remote_model
    cfg = ModelConfig(name_or_path=uri, storage_options=options)
    remote = load_model(cfg).eval()
    local = load_model(ModelConfig(name_or_path=str(small_model_dir))).eval()
    tok = load_tokenizer(cfg)
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(remote(ids).logits, local(ids).logits)  # fp32, same bytes: exact
    assert len(_cached(tmp_path)) == 1  # model and tokenizer share one fetched copy
    assert not any(n.startswith(".") for n in _cached(tmp_path))  # no temp dir left


def test_changed_remote_file_is_fetched_anew(remote_model, tmp_path):
    fs, uri, options = remote_model
    first = resolve_source(uri, storage_options=options)
    assert resolve_source(uri, storage_options=options) == first  # unchanged: a cache hit
    path = f"{uri.removeprefix('s3://')}/config.json"
    config = json.loads(fs.cat_file(path))
    config["deltatune_test_marker"] = 1
    fs.pipe_file(path, json.dumps(config).encode())
    second = resolve_source(uri, storage_options=options)
    assert second != first
    assert json.loads((core.modeling.Path(second) / "config.json").read_text())["deltatune_test_marker"] == 1
    assert "deltatune_test_marker" not in json.loads((core.modeling.Path(first) / "config.json").read_text())


def test_concurrent_fetch_of_the_same_key_keeps_the_winner(remote_model, tmp_path, monkeypatch):
    import shutil

    _, uri, options = remote_model
    real_replace = core.modeling.os.replace

    def lose_the_race(src, dst):
        shutil.copytree(src, dst)  # another process moved its complete copy in first
        (core.modeling.Path(dst) / "winner").write_text("theirs")
        return real_replace(src, dst)  # ours now meets a non-empty dir: OSError

    monkeypatch.setattr(core.modeling.os, "replace", lose_the_race)
    dest = core.modeling.Path(resolve_source(uri, storage_options=options))
    assert (dest / "winner").read_text() == "theirs"
    assert _cached(tmp_path) == [dest.name]  # our temp copy was removed


def test_missing_remote_dir_says_what_to_check(moto_s3, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    options = {"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}}
    with pytest.raises(FileNotFoundError, match="model.storage_options"):
        resolve_source(f"s3://{moto_s3.bucket}/nothing-here", storage_options=options)


@pytest.mark.parametrize("key", ["../../escaped.txt", "/abs/escaped.txt", "sub/./x.txt"])
def test_object_keys_that_would_escape_the_cache_are_refused(remote_model, tmp_path, key):
    """Object keys are arbitrary strings: m/../../x or m//abs would be written outside the cache (a
    .pth dropped into site-packages runs code: the safetensors-only rule would mean nothing)."""
    fs, uri, options = remote_model
    fs.pipe_file(f"{uri.removeprefix('s3://')}/{key}", b"payload")
    with pytest.raises(ValueError, match="not a plain relative path"):
        resolve_source(uri, storage_options=options)
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "cache" / "remote-models").exists()
