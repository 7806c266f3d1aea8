"""core.store against a real local folder and real S3 over HTTP (moto server on loopback)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import pytest
from fsspec.core import url_to_fs

from core import store
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


def test_promote_and_resolve_alias(st: Store, sources: dict[str, Path]) -> None:
    opts = st.options
    with pytest.raises(store.AliasNotFoundError, match="no alias 'prod'"):
        store.resolve_alias(st.uri, "tiny", "prod", storage_options=opts)
    first = store.publish(st.uri, "tiny", sources, storage_options=opts)
    second = store.publish(st.uri, "tiny", sources, storage_options=opts)
    with pytest.raises(store.VersionNotFoundError):
        store.promote(st.uri, "tiny", "v0099", "prod", storage_options=opts)

    record = store.promote(st.uri, "tiny", "v0001", "prod", gates={"eval_loss": 1.25}, storage_options=opts)
    assert record["manifest_sha256"] == first.manifest_sha256
    resolved = store.resolve_alias(st.uri, "tiny", "prod", storage_options=opts)
    assert resolved == record and resolved["gates"] == {"eval_loss": 1.25}
    raw = json.loads(st.fs.cat_file(st.path("tiny", "aliases", "prod.json")))
    assert raw["version"] == "v0001" and raw["promoted_at"].endswith("Z")

    store.promote(st.uri, "tiny", "v0002", "prod", storage_options=opts)
    resolved = store.resolve_alias(st.uri, "tiny", "prod", storage_options=opts)
    assert (resolved["version"], resolved["manifest_sha256"]) == ("v0002", second.manifest_sha256)

    # A rewritten manifest behind the alias is detected.
    path = st.path("tiny", "versions", "v0002", "manifest.json")
    st.fs.pipe_file(path, st.fs.cat_file(path).replace(b'"tiny"', b'"tiny" '))
    with pytest.raises(store.IntegrityError, match="manifest changed since it was promoted"):
        store.resolve_alias(st.uri, "tiny", "prod", storage_options=opts)


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

    with pytest.raises(ValueError, match=r"metadata\['auth'\]\['token'\] looks like a secret"):
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
