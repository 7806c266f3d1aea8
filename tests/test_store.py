"""core.store against a real local folder and real S3 over HTTP (moto server on loopback)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import pytest
from fsspec.core import url_to_fs

from core import store
from core.errors import DeltatuneError, is_retryable
from tests.s3_fixtures import DUMMY_KEY, DUMMY_SECRET


class Store(NamedTuple):
    uri: str
    options: dict[str, Any]
    fs: fsspec.AbstractFileSystem  # independent handle for raw reads and tampering
    root: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])


@pytest.fixture(params=["local", "s3"])
def st(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        uri = str(tmp_path / "artifacts")
        options: dict[str, Any] = {}
        raw: dict[str, Any] = {"auto_mkdir": True}
    else:
        s3 = request.getfixturevalue("moto_s3")
        uri, options = f"s3://{s3.bucket}/registry", s3.storage_options
        raw = {"use_listings_cache": False}
    fs, root = url_to_fs(uri, **options, **raw, skip_instance_cache=True)
    return Store(uri, options, fs, root)


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    (src / "adapter" / "sub").mkdir(parents=True)
    (src / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 1000)
    (src / "adapter" / "adapter_config.json").write_text('{"r": 8}\n')
    (src / "adapter" / "sub" / "extra.bin").write_bytes(b"\x00\x01extra")
    (src / "run_config.yaml").write_text("train:\n  lr: 1.0e-4\n")
    (src / "eval.json").write_text('{"loss": 1.25}\n')
    return {
        "adapter": src / "adapter",
        "run_config.yaml": src / "run_config.yaml",
        "eval.json": src / "eval.json",
    }


def expected_files(sources: dict[str, Path]) -> dict[str, tuple[int, str]]:
    """Independent walk and hash of the sources: relpath -> (size, sha256)."""
    out = {}
    for dest, src in sources.items():
        files = (
            [(dest, src)]
            if src.is_file()
            else [(f"{dest}/{p.relative_to(src).as_posix()}", p) for p in src.rglob("*") if p.is_file()]
        )
        for rel, p in files:
            data = p.read_bytes()
            out[rel] = (len(data), hashlib.sha256(data).hexdigest())
    return out


ALL_FILES = [
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "adapter/sub/extra.bin",
    "eval.json",
    "run_config.yaml",
]


def test_publish_writes_manifest_with_file_hashes(st: Store, sources: dict[str, Path]) -> None:
    result = store.publish(
        st.uri, "tiny", sources, metadata={"base": "llama-tiny"}, storage_options=st.options
    )

    assert result.version == "v0001"
    assert result.uploaded == ALL_FILES and result.skipped == []
    raw = st.fs.cat_file(st.path("tiny", "versions", "v0001", "manifest.json"))
    manifest = json.loads(raw)
    assert result.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    assert manifest["format"] == 1 and manifest["model"] == "tiny" and manifest["version"] == "v0001"
    assert manifest["created_at"].endswith("Z")
    assert manifest["metadata"] == {"base": "llama-tiny"}
    assert [f["path"] for f in manifest["files"]] == ALL_FILES
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == expected_files(sources)
    for rel, (_, sha) in expected_files(sources).items():
        stored = st.fs.cat_file(st.path("tiny", "versions", "v0001", rel))
        assert hashlib.sha256(stored).hexdigest() == sha
    # Staging records are gone once the version is visible; the claim marker stays.
    left = {p.rsplit("/versions/v0001/", 1)[1] for p in st.fs.find(st.path("tiny", "versions", "v0001"))}
    assert left == set(ALL_FILES) | {"manifest.json", ".claim"}
    assert store.read_manifest(st.uri, "tiny", "v0001", storage_options=st.options) == manifest


def test_auto_versions_increment_and_skip_torn_dirs(st: Store, sources: dict[str, Path]) -> None:
    opts = st.options
    assert store.list_versions(st.uri, "tiny", storage_options=opts) == []
    assert store.publish(st.uri, "tiny", sources, storage_options=opts).version == "v0001"
    assert store.publish(st.uri, "tiny", sources, storage_options=opts).version == "v0002"
    # A torn upload from another run: files but no manifest. It stays invisible and is not reused.
    st.fs.pipe_file(st.path("tiny", "versions", "v0003", "eval.json"), b"{}")
    assert store.list_versions(st.uri, "tiny", storage_options=opts) == ["v0001", "v0002"]
    assert store.publish(st.uri, "tiny", sources, storage_options=opts).version == "v0004"
    assert store.list_versions(st.uri, "tiny", storage_options=opts) == ["v0001", "v0002", "v0004"]
    assert store.list_versions(st.uri, "other", storage_options=opts) == []


def test_explicit_duplicate_version_raises(st: Store, sources: dict[str, Path]) -> None:
    store.publish(st.uri, "tiny", sources, version="rc1", storage_options=st.options)
    with pytest.raises(store.VersionExistsError, match="rc1.*already published.*another version"):
        store.publish(st.uri, "tiny", sources, version="rc1", storage_options=st.options)


def test_torn_publish_is_invisible_and_resumes_missing_files(
    st: Store, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_upload = store._upload_file
    calls: list[str] = []
    crash_on_call = 3

    def upload(s: Any, local: Path, remote: str) -> None:
        calls.append(remote.split("/versions/", 1)[1].split("/", 1)[1])
        if len(calls) == crash_on_call:
            raise ConnectionResetError("simulated crash")
        real_upload(s, local, remote)

    monkeypatch.setattr(store, "_upload_file", upload)
    with pytest.raises(
        store.PublishError, match=r"not visible.*version='v0001' and this error's resume"
    ) as e:
        store.publish(st.uri, "tiny", sources, storage_options=st.options)
    assert e.value.version == "v0001" and e.value.token
    assert calls == ALL_FILES[:3]
    # Another run given the same version name never uploads into the claimed directory.
    with pytest.raises(store.VersionExistsError, match="claimed by another publish"):
        store.publish(st.uri, "tiny", sources, version="v0001", storage_options=st.options)
    assert len(calls) == 3
    assert store.list_versions(st.uri, "tiny", storage_options=st.options) == []
    with pytest.raises(store.VersionNotFoundError, match="visible versions: none"):
        store.read_manifest(st.uri, "tiny", "v0001", storage_options=st.options)

    # Before resuming, one already-uploaded file changes locally: its staged hash no longer matches.
    (sources["adapter"] / "adapter_config.json").write_text('{"r": 16}\n')
    calls.clear()
    crash_on_call = 0
    result = store.publish(
        st.uri, "tiny", sources, version="v0001", resume_token=e.value.token, storage_options=st.options
    )

    assert calls == ["adapter/adapter_config.json", *ALL_FILES[2:]]
    assert result.uploaded == calls
    assert result.skipped == ["adapter/adapter_model.safetensors"]
    assert store.list_versions(st.uri, "tiny", storage_options=st.options) == ["v0001"]
    manifest = store.verify_version(st.uri, "tiny", "v0001", storage_options=st.options)
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == expected_files(sources)
    # The crashed run's claim is not handed to the next automatic publish.
    assert store.publish(st.uri, "tiny", sources, storage_options=st.options).version == "v0002"


def test_verify_detects_tampered_and_missing_files(st: Store, sources: dict[str, Path]) -> None:
    store.publish(st.uri, "tiny", sources, storage_options=st.options)
    assert store.verify_version(st.uri, "tiny", "v0001", storage_options=st.options)["version"] == "v0001"

    target = st.path("tiny", "versions", "v0001", "adapter", "sub", "extra.bin")
    original = st.fs.cat_file(target)
    st.fs.pipe_file(target, b"\x00\x01EXTRA")  # same size, different bytes
    with pytest.raises(store.IntegrityError, match=r"'adapter/sub/extra\.bin' does not match"):
        store.verify_version(st.uri, "tiny", "v0001", storage_options=st.options)

    st.fs.pipe_file(target, original)
    st.fs.rm(st.path("tiny", "versions", "v0001", "eval.json"))
    with pytest.raises(store.IntegrityError, match=r"'eval\.json' is listed in the manifest but missing"):
        store.verify_version(st.uri, "tiny", "v0001", storage_options=st.options)


def test_download_round_trip_and_tamper(st: Store, sources: dict[str, Path], tmp_path: Path) -> None:
    store.publish(st.uri, "tiny", sources, storage_options=st.options)
    dest = store.download_version(st.uri, "tiny", "v0001", tmp_path / "dl", storage_options=st.options)

    for rel, (size, sha) in expected_files(sources).items():
        data = (dest / rel).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha)
    assert json.loads((dest / "manifest.json").read_text())["version"] == "v0001"

    st.fs.pipe_file(st.path("tiny", "versions", "v0001", "eval.json"), b'{"loss": 0.01}\n')
    with pytest.raises(store.IntegrityError, match=r"downloaded 'eval\.json' does not match"):
        store.download_version(st.uri, "tiny", "v0001", tmp_path / "dl2", storage_options=st.options)
    assert not (tmp_path / "dl2" / "eval.json").exists()


def test_store_errors_carry_their_retry_verdict() -> None:
    retryable = {store.StoreUnavailableError, store.PublishError}
    for cls in (
        store.StoreUnavailableError,
        store.PublishError,
        store.VersionExistsError,
        store.VersionNotFoundError,
        store.AliasNotFoundError,
        store.AliasConflictError,
        store.IntegrityError,
    ):
        assert issubclass(cls, store.StoreError) and issubclass(cls, DeltatuneError)
        assert is_retryable(cls("x")) is (cls in retryable), cls


def test_promote_appends_to_the_alias_log_and_resolve_checks_the_target(
    st: Store, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = st.options
    monkeypatch.setenv("DELTATUNE_ACTOR", "ci@builder")
    with pytest.raises(store.AliasNotFoundError, match="no alias 'prod'"):
        store.resolve_alias(st.uri, "tiny", "prod", storage_options=opts)
    first = store.publish(st.uri, "tiny", sources, storage_options=opts)
    second = store.publish(st.uri, "tiny", sources, storage_options=opts)
    with pytest.raises(store.VersionNotFoundError):
        store.promote(st.uri, "tiny", "v0099", "prod", storage_options=opts)
    assert store.alias_history(st.uri, "tiny", "prod", storage_options=opts) == []
    with pytest.raises(ValueError, match="automatic version names"):
        store.promote(st.uri, "tiny", "v0001", "v0002", storage_options=opts)

    gates = [{"name": "min_improvement", "status": "passed"}]
    one = store.promote(
        st.uri, "tiny", "v0001", "prod", check=lambda state, reader: gates, storage_options=opts
    )
    assert (one["generation"], one["version"], one["previous"], one["action"]) == (
        1,
        "v0001",
        None,
        "promote",
    )
    assert (
        one["manifest_sha256"]
        == first.manifest_sha256
        == store.manifest_sha256(st.uri, "tiny", "v0001", storage_options=opts)
    )
    assert one["gates"] == gates and one["forced"] is False and one["promoted_by"] == "ci@builder"
    raw = json.loads(st.fs.cat_file(st.path("tiny", "aliases", "prod", "000001.json")))
    assert raw == one and raw["promoted_at"].endswith("Z")

    two = store.promote(st.uri, "tiny", "v0002", "prod", storage_options=opts)
    assert (two["generation"], two["version"], two["previous"]) == (2, "v0002", "v0001")
    assert store.resolve_alias(st.uri, "tiny", "prod", storage_options=opts) == two
    assert store.alias_history(st.uri, "tiny", "prod", storage_options=opts) == [one, two]
    assert store.list_aliases(st.uri, "tiny", storage_options=opts) == {"prod": two}
    assert two["manifest_sha256"] == second.manifest_sha256

    # A rewritten manifest behind the alias is detected, and so is a deleted version.
    path = st.path("tiny", "versions", "v0002", "manifest.json")
    original = st.fs.cat_file(path)
    st.fs.pipe_file(path, original.replace(b'"tiny"', b'"tiny" '))
    with pytest.raises(store.IntegrityError, match="manifest changed since it was promoted to 'prod'"):
        store.resolve_alias(st.uri, "tiny", "prod", storage_options=opts)
    st.fs.rm(path)
    with pytest.raises(store.VersionNotFoundError, match="points at v0002, which is no longer published"):
        store.resolve_alias(st.uri, "tiny", "prod", storage_options=opts)
    with pytest.raises(store.VersionNotFoundError):
        store.manifest_sha256(st.uri, "tiny", "v0002", storage_options=opts)


def test_promote_verifies_every_file_and_leaves_the_alias_on_refusal(
    st: Store, sources: dict[str, Path]
) -> None:
    opts = st.options
    store.publish(st.uri, "tiny", sources, storage_options=opts)
    store.publish(st.uri, "tiny", sources, storage_options=opts)
    store.promote(st.uri, "tiny", "v0001", "prod", storage_options=opts)
    target = st.path("tiny", "versions", "v0002", "adapter", "adapter_model.safetensors")
    data = bytearray(st.fs.cat_file(target))
    data[1000] ^= 0x01  # one bit of one byte
    st.fs.pipe_file(target, bytes(data))
    with pytest.raises(store.IntegrityError, match=r"adapter/adapter_model\.safetensors' does not match"):
        store.promote(st.uri, "tiny", "v0002", "prod", storage_options=opts)

    def refuse(state: store.AliasState, reader: store.VersionReader) -> list:
        assert state.version == "v0001" and reader.read_json("v0001", "eval.json") == {"loss": 1.25}
        raise RuntimeError("refused by the check")

    with pytest.raises(RuntimeError, match="refused by the check"):
        store.promote(st.uri, "tiny", "v0001", "prod", check=refuse, storage_options=opts)
    history = store.alias_history(st.uri, "tiny", "prod", storage_options=opts)
    assert [h["version"] for h in history] == ["v0001"]


def test_rollback_returns_to_the_previous_target_and_logs_it(st: Store, sources: dict[str, Path]) -> None:
    opts = st.options
    for _ in range(2):
        store.publish(st.uri, "tiny", sources, storage_options=opts)
    with pytest.raises(store.AliasNotFoundError):
        store.rollback(st.uri, "tiny", "prod", storage_options=opts)
    store.promote(st.uri, "tiny", "v0001", "prod", storage_options=opts)
    with pytest.raises(store.StoreError, match="pointed at v0001 only; there is nothing to roll back"):
        store.rollback(st.uri, "tiny", "prod", storage_options=opts)
    store.promote(st.uri, "tiny", "v0002", "prod", storage_options=opts)

    back = store.rollback(st.uri, "tiny", "prod", storage_options=opts)
    assert (back["generation"], back["action"], back["version"], back["previous"]) == (
        3,
        "rollback",
        "v0001",
        "v0002",
    )
    assert store.resolve_alias(st.uri, "tiny", "prod", storage_options=opts)["version"] == "v0001"
    again = store.rollback(st.uri, "tiny", "prod", storage_options=opts)  # undoes the rollback
    assert (again["version"], again["previous"]) == ("v0002", "v0001")
    history = store.alias_history(st.uri, "tiny", "prod", storage_options=opts)
    assert [(h["action"], h["previous"], h["version"]) for h in history] == [
        ("promote", None, "v0001"),
        ("promote", "v0001", "v0002"),
        ("rollback", "v0002", "v0001"),
        ("rollback", "v0001", "v0002"),
    ]
    # A rollback target that was altered since is refused, the alias stays.
    st.fs.pipe_file(st.path("tiny", "versions", "v0001", "eval.json"), b'{"loss": 0.01}\n')
    with pytest.raises(store.IntegrityError, match="'eval.json' does not match"):
        store.rollback(st.uri, "tiny", "prod", storage_options=opts)
    assert store.resolve_alias(st.uri, "tiny", "prod", storage_options=opts)["generation"] == 4


def test_pull_by_alias_or_version_leaves_no_partial_dest(
    st: Store, sources: dict[str, Path], tmp_path: Path
) -> None:
    opts = st.options
    out = tmp_path / "out"
    store.publish(st.uri, "tiny", sources, storage_options=opts)
    store.publish(st.uri, "tiny", sources, version="rc1", storage_options=opts)
    store.promote(st.uri, "tiny", "v0001", "prod", storage_options=opts)

    got = store.pull(st.uri, "tiny@prod", out / "a", storage_options=opts)
    assert (got["version"], got["alias"], got["files"]) == ("v0001", "prod", len(ALL_FILES))
    for rel, (size, sha) in expected_files(sources).items():
        data = (out / "a" / rel).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha)
    (out / "empty").mkdir()
    assert store.pull(st.uri, "tiny@rc1", out / "empty", storage_options=opts)["alias"] is None
    assert (out / "empty" / "manifest.json").is_file()
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        store.pull(st.uri, "tiny@v0001", out / "a", storage_options=opts)
    with pytest.raises(ValueError, match="expected MODEL@ALIAS or MODEL@VERSION"):
        store.pull(st.uri, "tiny", out / "b", storage_options=opts)
    with pytest.raises(store.VersionNotFoundError, match="neither an alias nor a version 'nope'"):
        store.pull(st.uri, "tiny@nope", out / "b", storage_options=opts)

    # One byte changed in a stored file: the pull fails and leaves neither DEST nor a temp dir.
    target = st.path("tiny", "versions", "v0001", "adapter", "sub", "extra.bin")
    st.fs.pipe_file(target, b"\x00\x01EXTRA")
    with pytest.raises(store.IntegrityError, match=r"downloaded 'adapter/sub/extra\.bin' does not match"):
        store.pull(st.uri, "tiny@prod", out / "b", storage_options=opts)
    assert sorted(p.name for p in out.iterdir()) == ["a", "empty"]
    # The alias's target deleted: a loud error, nothing downloaded.
    st.fs.rm(st.path("tiny", "versions", "v0001", "manifest.json"))
    with pytest.raises(
        store.VersionNotFoundError, match="alias 'prod' of tiny points at v0001, which is no longer"
    ):
        store.pull(st.uri, "tiny@prod", out / "b", storage_options=opts)
    assert not (out / "b").exists()


def test_create_only_write_refuses_second_writer(st: Store) -> None:
    handle = store._open_store(st.uri, st.options)
    path = st.path("m", "versions", "v0001", "manifest.json")
    store._put_bytes(handle, path, b"first", create_only=True)
    with pytest.raises(FileExistsError):
        store._put_bytes(handle, path, b"second", create_only=True)
    assert st.fs.cat_file(path) == b"first"
    store._put_bytes(handle, path, b"third", create_only=False)
    assert st.fs.cat_file(path) == b"third"


def test_manifest_race_lost_to_another_publisher(
    st: Store, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run claims the version between our existence check and our manifest write."""
    real_upload = store._upload_file
    rival = b'{"format": 1, "rival": true}\n'
    manifest_path = st.path("tiny", "versions", "v1", "manifest.json")

    def upload(s: Any, local: Path, remote: str) -> None:
        real_upload(s, local, remote)
        if not st.fs.exists(manifest_path):
            st.fs.pipe_file(manifest_path, rival)

    monkeypatch.setattr(store, "_upload_file", upload)
    with pytest.raises(store.VersionExistsError, match="published by another run"):
        store.publish(st.uri, "tiny", sources, version="v1", storage_options=st.options)
    assert st.fs.cat_file(manifest_path) == rival


def test_stale_listing_cannot_reclaim_a_version(
    st: Store, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publisher whose listing predates v0001 tries v0001 first; the create-only claim moves it on."""
    first = store.publish(st.uri, "tiny", sources, storage_options=st.options)
    real_dirs = store._version_dirs
    listings: list[list[str]] = []

    def stale_then_real(s: Any, model: str) -> list[str]:
        listings.append([] if not listings else real_dirs(s, model))
        return listings[-1]

    monkeypatch.setattr(store, "_version_dirs", stale_then_real)
    (sources["adapter"] / "adapter_config.json").write_text('{"r": 32}\n')
    assert store.publish(st.uri, "tiny", sources, storage_options=st.options).version == "v0002"
    assert listings[0] == []
    manifest = store.verify_version(st.uri, "tiny", "v0001", storage_options=st.options)
    assert manifest["files"] == [vars(f) for f in first.files]


def test_concurrent_automatic_publishers_get_distinct_versions(st: Store, sources: dict[str, Path]) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(store.publish(st.uri, "tiny", sources, storage_options=st.options).version)
        except BaseException as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == ["v0001", "v0002", "v0003"]
    for v in results:
        store.verify_version(st.uri, "tiny", v, storage_options=st.options)


def test_secrets_never_logged_or_stored(
    moto_s3: Any,  # noqa: F811
    sources: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = f"s3://{moto_s3.bucket}/reg"
    opts = moto_s3.storage_options
    caplog.set_level(logging.DEBUG, logger="core.store")
    store.publish(uri, "tiny", sources, storage_options=opts)
    store.promote(uri, "tiny", "v0001", "prod", storage_options=opts)
    store.download_version(uri, "tiny", "v0001", tmp_path / "dl", storage_options=opts)
    assert "storage_options=" in caplog.text  # the options were logged, redacted
    assert "***" in caplog.text
    assert DUMMY_SECRET not in caplog.text and DUMMY_KEY not in caplog.text
    fs, _ = url_to_fs(uri, **opts)
    for path in fs.find(moto_s3.bucket):
        data = fs.cat_file(path)
        assert DUMMY_SECRET.encode() not in data and DUMMY_KEY.encode() not in data, path

    with pytest.raises(ValueError, match=r"metadata\['auth'\]\['token'\]: a secret-looking key"):
        store.publish(uri, "tiny", sources, metadata={"auth": {"token": "x"}}, storage_options=opts)
    assert store.redact(
        {"secret": "s", "client_kwargs": {"aws_secret_access_key": "s", "region_name": "r"}}
    ) == {
        "secret": "***",
        "client_kwargs": {"aws_secret_access_key": "***", "region_name": "r"},
    }


@pytest.mark.parametrize("name", ["", "a/b", "..", "a..b", "-x", "x y"])
def test_bad_model_names_rejected(tmp_path: Path, sources: dict[str, Path], name: str) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        store.publish(str(tmp_path / "store"), name, sources)


def test_bad_sources_rejected(tmp_path: Path, sources: dict[str, Path]) -> None:
    uri = str(tmp_path / "store")
    with pytest.raises(FileNotFoundError, match=r"source for 'merged' does not exist: .*nope"):
        store.publish(uri, "tiny", {**sources, "merged": tmp_path / "nope"})
    with pytest.raises(ValueError, match="reserved"):
        store.publish(uri, "tiny", {"manifest.json": sources["eval.json"]})
    with pytest.raises(ValueError, match="invalid destination path"):
        store.publish(uri, "tiny", {"../escape": sources["eval.json"]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"source for 'merged' is an empty directory"):
        store.publish(uri, "tiny", {**sources, "merged": tmp_path / "empty"})
    with pytest.raises(ValueError, match=r"'adapter' would be both a file and a directory"):
        store.publish(uri, "tiny", {"adapter": sources["eval.json"], "adapter/x.json": sources["eval.json"]})
    assert store.list_versions(uri, "tiny") == []
    with pytest.raises(ValueError, match="at least one source"):
        store.publish(uri, "tiny", {})
    assert not (tmp_path / "store").exists()  # nothing was claimed


def test_unusable_stores_give_clear_errors(moto_s3: Any, tmp_path: Path, sources: dict[str, Path]) -> None:  # noqa: F811
    (tmp_path / "afile").write_text("x")
    with pytest.raises(store.StoreUnavailableError, match="is a file"):
        store.list_versions(str(tmp_path / "afile"), "tiny")
    with pytest.raises(store.StoreUnavailableError, match="does not exist; create the bucket"):
        store.publish("s3://no-such-bucket/x", "tiny", sources, storage_options=moto_s3.storage_options)

    dead = {
        **moto_s3.storage_options,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    with pytest.raises(store.StoreUnavailableError, match="cannot reach artifact store s3://b/x") as info:
        store.list_versions("s3://b/x", "tiny", storage_options=dead)
    assert DUMMY_SECRET not in str(info.value)


def test_credentials_scoped_to_the_store_prefix_can_publish(
    moto_s3: Any,  # noqa: F811
    sources: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An IAM policy that allows s3:ListBucket only under the store's prefix: listing the bucket's root
    is denied (moto does not enforce IAM here, so that one denial is injected), all else is real S3."""
    import s3fs

    real_ls = s3fs.S3FileSystem.ls

    def ls(self: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        if path.strip("/") == moto_s3.bucket:
            raise PermissionError("Access Denied (ListBucket on the bucket root)")
        return real_ls(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "ls", ls)
    uri = f"s3://{moto_s3.bucket}/team-a/models"
    result = store.publish(uri, "tiny", sources, storage_options=moto_s3.storage_options)
    assert result.version == "v0001"
    store.verify_version(uri, "tiny", "v0001", storage_options=moto_s3.storage_options)


def test_file_uri_and_relative_paths(
    tmp_path: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert store.publish("./artifacts", "tiny", sources).version == "v0001"
    assert store.list_versions(f"file://{tmp_path / 'artifacts'}", "tiny") == ["v0001"]


def _fail_after_manifest(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """The manifest PUT lands, but its reply is lost: the client sees ``exc`` (once)."""
    real_put = store._put_bytes
    failed: list[bool] = []

    def put(s: Any, path: str, data: bytes, *, create_only: bool) -> None:
        real_put(s, path, data, create_only=create_only)
        if path.endswith("/manifest.json") and not failed:
            failed.append(True)
            raise exc

    monkeypatch.setattr(store, "_put_bytes", put)


def test_manifest_reply_lost_then_client_retry_meets_its_own_object(
    st: Store, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # s3fs/botocore retry the PUT; IfNoneMatch then fails on the object the first try wrote.
    _fail_after_manifest(monkeypatch, FileExistsError("412 Precondition Failed"))
    result = store.publish(st.uri, "tiny", sources, storage_options=st.options)
    assert result.version == "v0001"
    assert store.list_versions(st.uri, "tiny", storage_options=st.options) == ["v0001"]
    store.verify_version(st.uri, "tiny", "v0001", storage_options=st.options)


def test_manifest_write_error_resumes_to_the_already_published_version(
    st: Store, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_after_manifest(monkeypatch, ConnectionResetError("reply lost"))
    with pytest.raises(store.PublishError, match="may not be visible yet") as e:
        store.publish(st.uri, "tiny", sources, storage_options=st.options)
    again = store.publish(
        st.uri,
        "tiny",
        sources,
        version=e.value.version,
        resume_token=e.value.token,
        storage_options=st.options,
    )
    assert again.version == "v0001" and again.uploaded == [] and len(again.skipped) == len(ALL_FILES)
    assert store.list_versions(st.uri, "tiny", storage_options=st.options) == ["v0001"]  # no duplicate
    # Without the token, or with other files, the published version is refused as ever.
    with pytest.raises(store.VersionExistsError, match="already published"):
        store.publish(st.uri, "tiny", sources, version="v0001", storage_options=st.options)
    (sources["eval.json"]).write_text('{"changed": true}\n')
    with pytest.raises(store.VersionExistsError, match="other files or metadata"):
        store.publish(
            st.uri, "tiny", sources, version="v0001", resume_token=e.value.token, storage_options=st.options
        )


def test_staging_cleanup_failure_does_not_fail_a_published_version(
    st: Store, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_rm = store._remove_quietly

    def rm(s: Any, path: str, recursive: bool = False) -> None:
        if path.endswith("/.partial"):
            raise PermissionError("AccessDenied: DeleteObjects")
        real_rm(s, path, recursive)

    monkeypatch.setattr(store, "_remove_quietly", rm)
    with caplog.at_level("WARNING", logger="core.store"):
        result = store.publish(st.uri, "tiny", sources, storage_options=st.options)
    assert result.version == "v0001" and "could not remove its staging files" in caplog.text
    assert store.list_versions(st.uri, "tiny", storage_options=st.options) == ["v0001"]


def test_lost_manifest_reply_through_an_outage_then_a_rerun_with_the_same_content_key(
    st: Store, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run 1: the manifest PUT lands, its reply is lost, and the store stays down through every retry.
    Run 2 re-ran eval (other timings in eval.json and in the metadata): it finds its version whole."""
    real_put, real_open = store._put_bytes, store._open_store
    down: list[bool] = []

    def put(s: Any, path: str, data: bytes, *, create_only: bool) -> None:
        real_put(s, path, data, create_only=create_only)
        if path.endswith("/manifest.json"):
            down.append(True)
            raise ConnectionError("reply lost: the outage begins")

    def open_store(uri: str, options: Any) -> Any:
        if down:
            raise store.StoreUnavailableError(f"cannot reach artifact store {uri} (outage)")
        return real_open(uri, options)

    monkeypatch.setattr(store, "_put_bytes", put)
    monkeypatch.setattr(store, "_open_store", open_store)
    meta = {"content_key": "ck-1", "train": {"wall_time_s": 10.5}}
    with pytest.raises(store.PublishError, match="may not be visible yet") as e:
        store.publish(st.uri, "tiny", sources, metadata=meta, content_key="ck-1", storage_options=st.options)
    version, token = e.value.version, e.value.token
    for _ in range(2):  # the task's retries, during the outage
        with pytest.raises(store.StoreUnavailableError):
            store.publish(
                st.uri,
                "tiny",
                sources,
                version=version,
                resume_token=token,
                metadata=meta,
                storage_options=st.options,
            )
    monkeypatch.setattr(store, "_put_bytes", real_put)
    monkeypatch.setattr(store, "_open_store", real_open)
    stored = store.verify_version(st.uri, "tiny", version, storage_options=st.options)

    sources["eval.json"].write_text('{"loss": 1.25, "seconds": 3.75}\n')
    rerun_meta = {"content_key": "ck-1", "train": {"wall_time_s": 12.0}}
    # Without the content key this is the case that wedged every rerun: refused, as before.
    with pytest.raises(store.VersionExistsError, match="other files or metadata"):
        store.publish(
            st.uri,
            "tiny",
            sources,
            version=version,
            resume_token=token,
            metadata={},
            storage_options=st.options,
        )
    with pytest.raises(store.VersionExistsError):
        store.publish(
            st.uri,
            "tiny",
            sources,
            version=version,
            resume_token=token,
            content_key="ck-2",
            storage_options=st.options,
        )
    again = store.publish(
        st.uri,
        "tiny",
        sources,
        version=version,
        resume_token=token,
        metadata=rerun_meta,
        content_key="ck-1",
        storage_options=st.options,
    )
    assert again.version == "v0001" and again.uploaded == []
    assert again.manifest_sha256 == store.manifest_sha256(st.uri, "tiny", "v0001", storage_options=st.options)
    assert [vars(f) for f in again.files] == stored["files"]  # the stored version, not the local files
    assert store.list_versions(st.uri, "tiny", storage_options=st.options) == ["v0001"]
    assert store.read_manifest(st.uri, "tiny", "v0001", storage_options=st.options)["metadata"] == meta
    with pytest.raises(ValueError, match="differs from metadata"):
        store.publish(
            st.uri,
            "tiny",
            sources,
            metadata={"content_key": "a"},
            content_key="b",
            storage_options=st.options,
        )


def _uploads(moto_s3: Any, prefix: str) -> list[dict[str, Any]]:
    import s3fs

    fs = s3fs.S3FileSystem(**moto_s3.storage_options, skip_instance_cache=True)
    return fs.call_s3("list_multipart_uploads", Bucket=moto_s3.bucket, Prefix=prefix).get("Uploads") or []


def test_an_interrupted_multipart_upload_is_aborted(
    moto_s3: Any,  # noqa: F811
    sources: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file of three 5 MiB parts fails at part 2, and s3fs's own abort fails too (the store is still
    flaky): publish aborts the upload itself; a resumed publish also clears one a killed uploader left."""
    import s3fs

    opts = {**moto_s3.storage_options, "default_block_size": 5 * 2**20}  # S3's smallest part size
    uri = f"s3://{moto_s3.bucket}/registry"
    big = sources["adapter"] / "adapter_model.safetensors"
    big.write_bytes(bytes(range(256)) * (11 * 2**12))  # 11 MiB: parts of 5, 5 and 1 MiB
    real_call = s3fs.S3FileSystem._call_s3
    seen: list[str] = []

    async def flaky(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(method)
        if method == "upload_part" and kwargs.get("PartNumber") == 2:
            raise ConnectionError("connection reset during part 2")
        if method == "abort_multipart_upload" and seen.count(method) == 1:
            raise ConnectionError("connection reset during s3fs's abort")
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", flaky)
    with pytest.raises(store.PublishError) as e:
        store.publish(uri, "tiny", sources, storage_options=opts)
    # s3fs's abort was tried and failed (publish's own goes through fs.call_s3, which this does not wrap).
    assert seen.count("create_multipart_upload") == 1 and seen.count("abort_multipart_upload") == 1
    assert _uploads(moto_s3, "registry/") == []
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", real_call)

    # A killed uploader leaves an upload behind, which the resumed publish aborts.
    fs = s3fs.S3FileSystem(**moto_s3.storage_options, skip_instance_cache=True)
    key = "registry/tiny/versions/v0001/adapter/adapter_model.safetensors"
    fs.call_s3("create_multipart_upload", Bucket=moto_s3.bucket, Key=key)
    assert len(_uploads(moto_s3, "registry/")) == 1
    result = store.publish(
        uri, "tiny", sources, version=e.value.version, resume_token=e.value.token, storage_options=opts
    )
    assert "adapter/adapter_model.safetensors" in result.uploaded
    assert _uploads(moto_s3, "registry/") == []
    store.verify_version(uri, "tiny", "v0001", storage_options=opts)  # the multipart object is whole


def test_gc_removes_old_claims_and_uploads_but_never_a_published_version(
    st: Store, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    opts = st.options
    store.publish(st.uri, "tiny", sources, storage_options=opts)  # v0001, published
    real_upload = store._upload_file

    def crash(s: Any, local: Path, remote: str) -> None:
        if remote.endswith("eval.json"):
            raise ConnectionResetError("killed")
        real_upload(s, local, remote)

    monkeypatch.setattr(store, "_upload_file", crash)
    with pytest.raises(store.PublishError):
        store.publish(st.uri, "tiny", sources, storage_options=opts)  # v0002: a claim and some files
    old_published = st.fs.find(st.path("tiny", "versions", "v0001"))
    time.sleep(4)  # S3 keeps object times to the second: give the two claims distinct ages
    t3 = time.time()

    def older_than() -> float:
        # v0003 is younger than now - t3 (+1 s of S3's rounding), v0002 older than now - t3 + 4: a cut
        # between them however slow the steps below are on a loaded machine.
        return time.time() - t3 + 2.0

    with pytest.raises(store.PublishError):
        store.publish(st.uri, "tiny", sources, storage_options=opts)  # v0003: a fresh claim
    monkeypatch.setattr(store, "_upload_file", real_upload)
    st.fs.pipe_file(st.path("tiny", "versions", "v0004", "eval.json"), b"{}")  # no claim: not ours
    leftover_keys = []
    if request.node.callspec.params["st"] == "s3":
        import s3fs

        fs = s3fs.S3FileSystem(**st.options, skip_instance_cache=True)
        bucket = st.root.split("/", 1)[0]
        for key in ("registry/tiny/versions/v0002/merged/model.safetensors", "elsewhere/big.bin"):
            fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
            leftover_keys.append(key)

    dry = store.gc(st.uri, older_than_s=older_than(), storage_options=opts, dry_run=True)
    assert [(c["model"], c["version"]) for c in dry["claims"]] == [("tiny", "v0002")]
    assert [u["key"] for u in dry["multipart_uploads"]] == leftover_keys[:1]
    assert st.fs.exists(st.path("tiny", "versions", "v0002", ".claim"))

    done = store.gc(st.uri, older_than_s=older_than(), storage_options=opts)
    assert done["claims"] == dry["claims"] and done["multipart_uploads"] == dry["multipart_uploads"]
    assert not st.fs.exists(st.path("tiny", "versions", "v0002"))
    assert st.fs.exists(st.path("tiny", "versions", "v0003", ".claim"))
    assert st.fs.exists(st.path("tiny", "versions", "v0004", "eval.json"))
    assert st.fs.find(st.path("tiny", "versions", "v0001")) == old_published
    store.verify_version(st.uri, "tiny", "v0001", storage_options=opts)
    if leftover_keys:
        assert [u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])] == [
            "elsewhere/big.bin"  # outside the store's prefix: not gc's to remove
        ]
    # With age 0 the fresh claim goes too; the published version still stays.
    assert [c["version"] for c in store.gc(st.uri, older_than_s=0, storage_options=opts)["claims"]] == [
        "v0003"
    ]
    assert store.list_versions(st.uri, "tiny", storage_options=opts) == ["v0001"]


# --- file modes of a local store -------------------------------------------------------------------


@pytest.fixture
def shared_dir(tmp_path: Path):
    """A directory under /tmp that every user may enter (pytest's own tmp dirs are 0700)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="deltatune-shared-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("umask, file_mode", [(0o022, 0o644), (0o002, 0o664)])
def test_local_store_files_take_the_process_umask_so_other_users_can_verify(
    shared_dir: Path, sources: dict[str, Path], umask: int, file_mode: int
) -> None:
    import os
    import stat
    import subprocess

    uri = str(shared_dir / "store")
    old = os.umask(umask)
    try:
        store.publish(uri, "tiny", sources)
        store.promote(uri, "tiny", "v0001", "production")
    finally:
        os.umask(old)
    vdir = shared_dir / "store" / "tiny" / "versions" / "v0001"
    written = [
        vdir / "manifest.json",
        vdir / ".claim",
        shared_dir / "store/tiny/aliases/production/000001.json",
    ]
    for path in written:  # what the store writes itself (create-only, via a temp file)
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    for path in (shared_dir / "store").rglob("*"):  # and everything else, like any other file
        want = (0o777 & ~umask) if path.is_dir() else file_mode
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    assert not [p for p in (shared_dir / "store").rglob(".tmp-*")]  # no temp file left behind

    if os.geteuid() == 0:  # root may become another user: "nobody" re-hashes the version's files
        manifest = json.loads((vdir / "manifest.json").read_text())
        paths = [e["path"] for e in manifest["files"]]
        out = subprocess.run(
            ["sha256sum", "manifest.json", "../../aliases/production/000001.json", *paths],
            user=65534,  # nobody (the kernel checks its access, not ours)
            cwd=vdir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        sums = {line.split()[1]: line.split()[0] for line in out.stdout.splitlines()}
        assert {e["path"]: e["sha256"] for e in manifest["files"]} == {p: sums[p] for p in paths}
        assert sums["manifest.json"] == store.manifest_sha256(uri, "tiny", "v0001")
