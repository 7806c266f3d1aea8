"""Artifact store: publish, verify, download and promote model versions under an fsspec URI.

Layout: ``<store>/<model>/versions/<version>/{manifest.json, ...}``, ``<store>/<model>/aliases/<alias>.json``.
A version is visible only once its ``manifest.json`` exists; the manifest is written last, create-only.
Usage: ``publish("s3://bucket/models", "tiny-lora", {"adapter": Path("out/adapter")})``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs

from core.secretkeys import SECRET_KEY, redact

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"
# Staging area inside an unfinished version: one JSON sidecar per uploaded file, written after the file
# itself, so a sidecar proves that upload completed. Removed once the manifest exists.
STAGING_DIR = ".partial"
# Create-only marker that claims a version directory for one publisher (see _claim_auto_version). It holds
# that publisher's token: only a publish that presents the token resumes the version. It is kept after
# publishing: a publisher with a stale listing must never re-claim a published version.
CLAIM_NAME = ".claim"
CHUNK_SIZE = 1 << 20
_AUTO_VERSION = re.compile(r"^v(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RESERVED = {MANIFEST_NAME, STAGING_DIR, CLAIM_NAME}
_LOCAL_PROTOCOLS = {"file", "local"}


class StoreError(Exception):
    """Base class for artifact store errors."""


class StoreUnavailableError(StoreError):
    """The store could not be reached or its root does not exist."""


class VersionExistsError(StoreError):
    """The version already has a manifest: published versions are immutable."""


class VersionNotFoundError(StoreError):
    """No visible (manifest-bearing) version of that name exists."""


class AliasNotFoundError(StoreError):
    """The alias has never been promoted."""


class IntegrityError(StoreError):
    """A stored file is missing or its size / sha256 differs from the manifest."""


class PublishError(StoreError):
    """A publish stopped part-way; the version stays invisible and the same call resumes it."""

    def __init__(self, message: str, *, version: str | None = None, token: str | None = None):
        super().__init__(message)
        self.version = version  # pass it back as ``version=`` to resume ...
        self.token = token  # ... with ``resume_token=``: the claim that proves the version is this run's


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: path relative to the version root, size in bytes, sha256 hex."""

    path: str
    size: int
    sha256: str


_ENTRY_KEYS = {"path", "size", "sha256"}


@dataclass(frozen=True)
class PublishResult:
    """What ``publish`` did: where the version lives, its manifest hash, which files moved this run."""

    model: str
    version: str
    uri: str
    manifest_sha256: str
    files: list[FileEntry]
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    token: str = ""  # the claim token of this publish (see ``publish(resume_token=)``)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for Prefect task results)."""
        return asdict(self)


# ----------------------------------------------------------------------------- validation and redaction


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"invalid {kind} {name!r}: expected a non-empty name of letters, digits, '.', '_', '-' "
            f"that starts with a letter or digit (no '/', no '..'); e.g. 'llama-tiny-lora'"
        )
    return name


def _check_relpath(relpath: str) -> str:
    parts = relpath.replace("\\", "/").split("/")
    if not relpath or relpath.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"invalid destination path {relpath!r}: expected a relative path like 'adapter' or "
            f"'eval.json' without '..', '.', empty parts or a leading '/'"
        )
    if parts[0] in _RESERVED:
        raise ValueError(f"destination path {relpath!r} is reserved by the store; choose another name")
    return "/".join(parts)


def _safe_uri(uri: str) -> str:
    """Drop ``user:password@`` from a URI so it can be logged or raised."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=host))


def _check_metadata(metadata: Any, where: str = "metadata") -> None:
    if isinstance(metadata, Mapping):
        for k, v in metadata.items():
            if SECRET_KEY.search(str(k)):
                raise ValueError(
                    f"{where}[{k!r}] looks like a secret; manifests are readable by anyone with store "
                    f"access, so remove it (pass credentials through storage_options instead)"
                )
            _check_metadata(v, f"{where}[{k!r}]")
    elif isinstance(metadata, (list, tuple)):
        for i, v in enumerate(metadata):
            _check_metadata(v, f"{where}[{i}]")


# ----------------------------------------------------------------------------- filesystem helpers


@dataclass(frozen=True)
class _Store:
    fs: fsspec.AbstractFileSystem
    root: str
    uri: str  # safe for logs

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        protocols = {protocol} if isinstance(protocol, str) else set(protocol)
        return bool(protocols & _LOCAL_PROTOCOLS)

    def model_dir(self, model: str) -> str:
        return f"{self.root}/{_check_name('model name', model)}"

    def version_dir(self, model: str, version: str) -> str:
        return f"{self.model_dir(model)}/versions/{_check_name('version', version)}"

    def alias_path(self, model: str, alias: str) -> str:
        return f"{self.model_dir(model)}/aliases/{_check_name('alias', alias)}.json"

    def version_uri(self, model: str, version: str) -> str:
        return f"{self.uri.rstrip('/')}/{model}/versions/{version}"


def check_store(store_uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise ``StoreUnavailableError`` now if the store cannot be reached (before hours of training)."""
    _open_store(store_uri, storage_options)


def _open_store(store_uri: str, storage_options: Mapping[str, Any] | None) -> _Store:
    """Resolve a store URI to a filesystem and root path, and check the store is reachable."""
    if not store_uri or not isinstance(store_uri, str):
        raise ValueError(f"store_uri must be a non-empty path or URI, got {store_uri!r}")
    options = dict(storage_options or {})
    safe = _safe_uri(store_uri)
    protocol = store_uri.split("://", 1)[0] if "://" in store_uri else "file"
    if protocol not in _LOCAL_PROTOCOLS:
        # Several publishers share one store: a cached listing would hide their versions and claims.
        options.setdefault("use_listings_cache", False)
    logger.debug("opening artifact store %s with storage_options=%s", safe, redact(options))
    try:
        fs, root = url_to_fs(store_uri, **options)
    except (ImportError, ValueError) as exc:
        raise StoreUnavailableError(f"cannot open artifact store {safe}: {exc}") from None
    store = _Store(fs=fs, root=root.rstrip("/") or root, uri=safe)
    _check_reachable(store)
    return store


def _check_reachable(store: _Store) -> None:
    fs, root = store.fs, store.root
    if store.is_local:
        if fs.exists(root) and not fs.isdir(root):
            raise StoreUnavailableError(f"artifact store {store.uri} is a file, expected a directory")
        return
    top = root.split("/", 1)[0]  # the bucket for object stores
    # The store's own prefix first: credentials scoped to that prefix may not list the bucket's root.
    for path in dict.fromkeys([root, top]):
        try:
            fs.ls(path, detail=False, refresh=True)
            return
        except FileNotFoundError:
            if path == top:
                raise StoreUnavailableError(
                    f"artifact store {store.uri}: {top!r} does not exist; create the bucket first"
                ) from None
            # an empty prefix (nothing published yet): ask whether the bucket exists
        except PermissionError as exc:
            if path == top and top != root:
                return  # may list the store's prefix, not the bucket: the claim write will tell
            raise StoreUnavailableError(
                f"artifact store {store.uri}: access denied to {path!r} ({exc})"
            ) from None
        except Exception as exc:  # network errors come in many types (botocore, aiohttp, OSError)
            raise StoreUnavailableError(
                f"cannot reach artifact store {store.uri} ({type(exc).__name__}: {exc}); check the "
                "endpoint (storage_options.client_kwargs.endpoint_url), the network, and the credentials "
                "in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"
            ) from None


def _put_bytes(store: _Store, path: str, data: bytes, *, create_only: bool) -> None:
    """Write ``data`` to ``path`` atomically; with ``create_only`` fail if it exists.

    Raises:
        FileExistsError: ``create_only`` and the path already exists.
    """
    fs = store.fs
    if store.is_local:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if create_only:
                os.link(tmp, path)  # atomic create-only: EEXIST if someone else got there first
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    # s3fs sends IfNoneMatch="*" for mode="create" and maps the 412 to FileExistsError; a single PUT
    # is atomic, so readers never see a half-written object. Other backends may emulate "create".
    fs.pipe_file(path, data, mode="create" if create_only else "overwrite")


def _read_json(store: _Store, path: str) -> tuple[dict[str, Any], bytes]:
    data = store.fs.cat_file(path)
    return json.loads(data), data


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _hash_stream(f: Any) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    while chunk := f.read(CHUNK_SIZE):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


def hash_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    """Return ``(size, sha256 hex)`` of a local file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return _hash_stream(f)


def _remove_quietly(store: _Store, path: str, recursive: bool = False) -> None:
    try:
        store.fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------- publish


def _expand_sources(sources: Mapping[str, str | os.PathLike[str]]) -> dict[str, Path]:
    """Map every destination relpath to a local file, walking directories in sorted order."""
    if not sources:
        raise ValueError("publish needs at least one source, e.g. {'adapter': Path('out/adapter')}")
    files: dict[str, Path] = {}
    for dest, src in sources.items():
        dest = _check_relpath(dest)
        src = Path(src)
        if src.is_file():
            pairs: Iterator[tuple[str, Path]] = iter([(dest, src)])
        elif src.is_dir():
            pairs = (
                (f"{dest}/{p.relative_to(src).as_posix()}", p) for p in sorted(src.rglob("*")) if p.is_file()
            )
        else:
            raise FileNotFoundError(
                f"source for {dest!r} does not exist: {src}; expected a file or directory"
            )
        before = len(files)
        for rel, path in pairs:
            if rel in files:
                raise ValueError(
                    f"two sources write {rel!r} ({files[rel]} and {path}); give them distinct paths"
                )
            files[rel] = path
        if len(files) == before:
            raise ValueError(f"source for {dest!r} is an empty directory: {src}; nothing to publish there")
    # A path that is both a file and a directory of another cannot be stored on a filesystem.
    dirs = {rel.rsplit("/", i)[0] for rel in files for i in range(1, rel.count("/") + 1)}
    if clash := sorted(dirs & files.keys()):
        raise ValueError(
            f"{clash[0]!r} would be both a file and a directory in the version; rename one source"
        )
    return files


def _version_dirs(store: _Store, model: str) -> list[str]:
    """Names of every version directory, complete or not."""
    versions_dir = f"{store.model_dir(model)}/versions"
    try:
        entries = store.fs.ls(versions_dir, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")


def _claim_auto_version(store: _Store, model: str, token: str, attempts: int = 20) -> str:
    """Claim the next free ``vNNNN`` with a create-only marker so concurrent publishers never share one.

    Torn (manifest-less) directories count as used: a different run must not inherit their files.
    """
    for _ in range(attempts):
        numbers = [int(m.group(1)) for d in _version_dirs(store, model) if (m := _AUTO_VERSION.match(d))]
        version = f"v{max(numbers, default=0) + 1:04d}"
        try:
            _put_bytes(
                store,
                f"{store.version_dir(model, version)}/{CLAIM_NAME}",
                _dumps({"at": _now(), "token": token}),
                create_only=True,
            )
        except FileExistsError:
            logger.debug("version %s/%s claimed by another publisher; trying the next", model, version)
            continue
        return version
    raise PublishError(f"could not claim a free version of {model!r} after {attempts} attempts")


def _claim_token(store: _Store, vdir: str) -> str | None:
    try:
        claim, _ = _read_json(store, f"{vdir}/{CLAIM_NAME}")
    except (FileNotFoundError, ValueError):
        return None
    return claim.get("token")


def _claim_explicit_version(store: _Store, model: str, version: str, token: str, resuming: bool) -> bool:
    """Claim ``version`` for the publisher holding ``token``; True if that publisher already finished it.

    An unfinished version is resumed only by the publisher whose token is in its claim: two runs given
    the same version name must never upload into one directory, and a published version's files must
    never be overwritten.
    """
    vdir = store.version_dir(model, version)
    if store.fs.exists(f"{vdir}/{MANIFEST_NAME}"):
        if resuming and _claim_token(store, vdir) == token:
            return True  # this publisher's own earlier attempt wrote the manifest; its reply was lost
        raise VersionExistsError(
            f"{model}/{version} is already published in {store.uri}; versions are immutable: publish "
            f"with another version (or version=None for the next automatic one)"
        )
    try:
        _put_bytes(store, f"{vdir}/{CLAIM_NAME}", _dumps({"at": _now(), "token": token}), create_only=True)
    except FileExistsError:
        if not (resuming and _claim_token(store, vdir) == token):
            raise VersionExistsError(
                f"{model}/{version} in {store.uri} is claimed by another publish that has not finished; "
                "two runs never share a version. Publish this run as another version (or version=None); "
                "to resume a run's own interrupted publish, pass the token from its failed attempt "
                "(resume_token=, kept in the run's publish_state.json)"
            ) from None
        logger.info("resuming unfinished publish of %s/%s", model, version)
    return False


def _upload_file(store: _Store, local: Path, remote: str) -> None:
    """Upload one file (single PUT or multipart on S3). Separate so tests can interrupt a publish."""
    if store.is_local:
        store.fs.makedirs(store.fs._parent(remote), exist_ok=True)
    store.fs.put_file(str(local), remote)


def _already_uploaded(store: _Store, remote: str, sidecar: str, entry: FileEntry) -> bool:
    try:
        record, _ = _read_json(store, sidecar)
        size = store.fs.size(remote)
    except FileNotFoundError:
        return False
    return record.get("sha256") == entry.sha256 and record.get("size") == entry.size == size


def publish(
    store_uri: str,
    model: str,
    sources: Mapping[str, str | os.PathLike[str]],
    *,
    version: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    resume_token: str | None = None,
) -> PublishResult:
    """Upload local files as one immutable version and make it visible by writing its manifest last.

    Every publish claims its version with a create-only ``.claim`` holding a fresh token. Re-running
    with the ``version`` and ``resume_token`` of a failed attempt (both on its ``PublishError``)
    resumes it: files whose staged sha256 and remote size match are skipped; if that attempt had in
    fact written the manifest, the published version is returned as is. Without the token, a claimed
    or published version is refused. The manifest is created with a create-only write (S3
    ``IfNoneMatch="*"``, local hard link), so two publishers cannot both publish one version.

    Args:
        store_uri: Store root: a local path, ``file://`` URI or ``s3://bucket/prefix``.
        model: Model name (letters, digits, ``._-``).
        sources: Destination path inside the version -> local file or directory,
            e.g. ``{"adapter": Path("out/adapter"), "eval.json": Path("out/eval.json")}``.
        version: Version name; ``None`` claims the next automatic ``v0001``, ``v0002``, ...
        metadata: JSON-serialisable extra fields for the manifest (no secrets).
        storage_options: Passed to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        resume_token: The ``token`` of a failed attempt's ``PublishError``, with its ``version``.

    Returns:
        A ``PublishResult`` with the version, its URI, the manifest sha256, the files moved this run
        and the claim token.

    Raises:
        VersionExistsError: ``version`` already has a manifest, or another publish claimed it.
        PublishError: An upload failed; ``version`` and ``token`` on it resume the publish.
        FileNotFoundError, ValueError: Bad sources, names or metadata.
        StoreUnavailableError: The store cannot be reached.
    """
    _check_name("model name", model)
    if version is not None:
        _check_name("version", version)
    metadata = dict(metadata or {})
    _check_metadata(metadata)
    try:
        json.dumps(metadata)
    except TypeError as exc:
        raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
    local_files = _expand_sources(sources)
    entries = [FileEntry(rel, *hash_file(path)) for rel, path in sorted(local_files.items())]

    store = _open_store(store_uri, storage_options)
    if resume_token is not None and version is None:
        raise ValueError("resume_token resumes a named version: pass the failed attempt's version too")
    token = resume_token or uuid.uuid4().hex
    if version is None:
        version = _claim_auto_version(store, model, token)
    elif _claim_explicit_version(store, model, version, token, resuming=resume_token is not None):
        return _published_as_is(store, model, version, entries, metadata, token)
    vdir = store.version_dir(model, version)
    logger.info("publishing %d files to %s", len(entries), store.version_uri(model, version))

    uploaded: list[str] = []
    skipped: list[str] = []
    try:
        for entry in entries:
            remote = f"{vdir}/{entry.path}"
            sidecar = f"{vdir}/{STAGING_DIR}/{entry.path}.json"
            if _already_uploaded(store, remote, sidecar, entry):
                skipped.append(entry.path)
                continue
            # Drop a stale sidecar first: if this upload dies, nothing vouches for the torn file.
            _remove_quietly(store, sidecar)
            _upload_file(store, local_files[entry.path], remote)
            _put_bytes(
                store, sidecar, _dumps({"sha256": entry.sha256, "size": entry.size}), create_only=False
            )
            uploaded.append(entry.path)
            logger.debug("uploaded %s (%d bytes)", entry.path, entry.size)
    except Exception as exc:
        raise PublishError(
            f"publish of {model}/{version} to {store.uri} stopped after {len(uploaded)} new files "
            f"({type(exc).__name__}: {exc}); the version is not visible. Re-run publish with "
            f"version={version!r} and this error's resume token to resume.",
            version=version,
            token=token,
        ) from exc

    manifest = {
        "format": MANIFEST_FORMAT,
        "model": model,
        "version": version,
        "created_at": _now(),
        "files": [asdict(e) for e in entries],
        "metadata": metadata,
    }
    data = _dumps(manifest)
    try:
        _put_bytes(store, f"{vdir}/{MANIFEST_NAME}", data, create_only=True)
    except FileExistsError:
        # Our own write whose reply was lost (the client retried the PUT and met its own object), or
        # another publisher: only the former has our claim and exactly our files.
        if _claim_token(store, vdir) == token:
            return _published_as_is(store, model, version, entries, metadata, token)
        raise VersionExistsError(
            f"{model}/{version} was published by another run while this one uploaded; its files may "
            f"be mixed: run verify_version on it, and publish this run as a new version"
        ) from None
    except Exception as exc:
        raise PublishError(
            f"writing the manifest of {model}/{version} to {store.uri} failed ({type(exc).__name__}: "
            f"{exc}); the version may not be visible yet. Re-run publish with version={version!r} and "
            "this error's resume token: it finishes the version or finds it already published.",
            version=version,
            token=token,
        ) from exc
    logger.info(
        "published %s (%d uploaded, %d resumed)",
        store.version_uri(model, version),
        len(uploaded),
        len(skipped),
    )
    return _published(store, model, version, entries, data, token, uploaded, skipped)


def _published(
    store: _Store,
    model: str,
    version: str,
    entries: list[FileEntry],
    manifest: bytes,
    token: str,
    uploaded: list[str],
    skipped: list[str],
) -> PublishResult:
    """Tidy a published version's staging sidecars and describe it. Failing to tidy must not fail
    (or repeat) the publish."""
    try:
        _remove_quietly(store, f"{store.version_dir(model, version)}/{STAGING_DIR}", recursive=True)
    except Exception as exc:
        logger.warning("published %s/%s but could not remove its staging files: %s", model, version, exc)
    return PublishResult(
        model=model,
        version=version,
        uri=store.version_uri(model, version),
        manifest_sha256=hashlib.sha256(manifest).hexdigest(),
        files=entries,
        uploaded=uploaded,
        skipped=skipped,
        token=token,
    )


def _published_as_is(
    store: _Store, model: str, version: str, entries: list[FileEntry], metadata: dict, token: str
) -> PublishResult:
    """The result of a publish that an earlier attempt with this token already finished, provided
    the manifest lists exactly these files: else the sources changed since, and that is an error."""
    manifest, data = _read_json(store, f"{store.version_dir(model, version)}/{MANIFEST_NAME}")
    listed = [
        FileEntry(**f) for f in manifest.get("files", []) if isinstance(f, dict) and f.keys() == _ENTRY_KEYS
    ]
    if listed != entries or manifest.get("metadata") != metadata:
        raise VersionExistsError(
            f"{model}/{version} was published by another run, or by an earlier attempt with other "
            "files or metadata than these; its files may be mixed: run verify_version on it, and "
            "publish this run as a new version"
        )
    logger.info("%s/%s was already published by an earlier attempt; nothing to do", model, version)
    return _published(store, model, version, entries, data, token, [], [e.path for e in entries])


# ----------------------------------------------------------------------------- read side


def _version_sort_key(version: str) -> tuple[int, int, str]:
    m = _AUTO_VERSION.match(version)
    return (0, int(m.group(1)), version) if m else (1, 0, version)


def list_versions(
    store_uri: str, model: str, *, storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """List the visible (manifest-bearing) versions of a model, oldest automatic version first.

    Args:
        store_uri: Store root.
        model: Model name.
        storage_options: Passed to fsspec.

    Returns:
        Version names; unfinished publishes are left out.
    """
    store = _open_store(store_uri, storage_options)
    dirs = _version_dirs(store, model)
    visible = [v for v in dirs if store.fs.exists(f"{store.version_dir(model, v)}/{MANIFEST_NAME}")]
    return sorted(visible, key=_version_sort_key)


def _load_manifest(store: _Store, model: str, version: str) -> tuple[dict[str, Any], bytes]:
    path = f"{store.version_dir(model, version)}/{MANIFEST_NAME}"
    try:
        manifest, data = _read_json(store, path)
    except FileNotFoundError:
        visible = [
            v
            for v in _version_dirs(store, model)
            if store.fs.exists(f"{store.version_dir(model, v)}/{MANIFEST_NAME}")
        ]
        raise VersionNotFoundError(
            f"{model}/{version} is not published in {store.uri} (no manifest); visible versions: "
            f"{sorted(visible, key=_version_sort_key) or 'none'}"
        ) from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise StoreError(
            f"{model}/{version} manifest has format {manifest.get('format')!r}, this deltatune reads "
            f"format {MANIFEST_FORMAT}; upgrade deltatune"
        )
    return manifest, data


def read_manifest(
    store_uri: str, model: str, version: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Return the manifest of a published version.

    Raises:
        VersionNotFoundError: The version has no manifest.
    """
    return _load_manifest(_open_store(store_uri, storage_options), model, version)[0]


def _verify(store: _Store, model: str, version: str) -> dict[str, Any]:
    manifest, _ = _load_manifest(store, model, version)
    vdir = store.version_dir(model, version)
    for entry in manifest["files"]:
        remote = f"{vdir}/{entry['path']}"
        try:
            with store.fs.open(remote, "rb") as f:
                size, sha = _hash_stream(f)
        except FileNotFoundError:
            raise IntegrityError(
                f"{model}/{version}: {entry['path']!r} is listed in the manifest but missing from {store.uri}"
            ) from None
        if (size, sha) != (entry["size"], entry["sha256"]):
            raise IntegrityError(
                f"{model}/{version}: {entry['path']!r} does not match the manifest (size {size} vs "
                f"{entry['size']}, sha256 {sha[:12]}… vs {entry['sha256'][:12]}…); the stored copy was "
                f"altered: re-publish as a new version"
            )
    logger.info("verified %s (%d files)", store.version_uri(model, version), len(manifest["files"]))
    return manifest


def verify_version(
    store_uri: str, model: str, version: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Re-hash every stored file of a version against its manifest.

    Returns:
        The manifest, when every file is present with the recorded size and sha256.

    Raises:
        IntegrityError: Names the first missing or mismatching file.
        VersionNotFoundError: The version has no manifest.
    """
    return _verify(_open_store(store_uri, storage_options), model, version)


def download_version(
    store_uri: str,
    model: str,
    version: str,
    dest_dir: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """Download a published version into ``dest_dir`` and check every file's sha256.

    Args:
        store_uri: Store root.
        model: Model name.
        version: Published version.
        dest_dir: Local directory; created if missing. The manifest is copied in too.
        storage_options: Passed to fsspec.

    Returns:
        ``dest_dir`` as a ``Path``.

    Raises:
        IntegrityError: A downloaded file differs from the manifest (it is deleted).
    """
    store = _open_store(store_uri, storage_options)
    manifest, data = _load_manifest(store, model, version)
    dest = Path(dest_dir)
    vdir = store.version_dir(model, version)
    for entry in manifest["files"]:
        local = dest / _check_relpath(entry["path"])
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.fs.get_file(f"{vdir}/{entry['path']}", str(local))
        except FileNotFoundError:
            raise IntegrityError(
                f"{model}/{version}: {entry['path']!r} is missing from {store.uri}"
            ) from None
        size, sha = hash_file(local)
        if (size, sha) != (entry["size"], entry["sha256"]):
            local.unlink()
            raise IntegrityError(
                f"{model}/{version}: downloaded {entry['path']!r} does not match the manifest "
                f"(size {size} vs {entry['size']}, sha256 {sha[:12]}… vs {entry['sha256'][:12]}…); "
                f"run verify_version"
            )
    (dest / MANIFEST_NAME).write_bytes(data)
    logger.info("downloaded %s to %s", store.version_uri(model, version), dest)
    return dest


# ----------------------------------------------------------------------------- aliases


def promote(
    store_uri: str,
    model: str,
    version: str,
    alias: str,
    *,
    gates: Mapping[str, Any] | None = None,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Point ``aliases/<alias>.json`` at a published version (atomic overwrite).

    Args:
        store_uri: Store root.
        model: Model name.
        version: A published version.
        alias: Alias name, e.g. ``"prod"``.
        gates: JSON-serialisable record of the checks that allowed the promotion.
        verify: Re-hash the version's files first (reads every file).
        storage_options: Passed to fsspec.

    Returns:
        The alias record: ``version``, ``promoted_at``, ``manifest_sha256``, ``gates``.
    """
    _check_name("alias", alias)
    gates = dict(gates or {})
    _check_metadata(gates, "gates")
    store = _open_store(store_uri, storage_options)
    if verify:
        _verify(store, model, version)
    _, data = _load_manifest(store, model, version)
    record = {
        "version": version,
        "promoted_at": _now(),
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
        "gates": gates,
    }
    _put_bytes(store, store.alias_path(model, alias), _dumps(record), create_only=False)
    logger.info("promoted %s/%s to alias %r", model, version, alias)
    return record


def resolve_alias(
    store_uri: str, model: str, alias: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Read an alias and check that the version's manifest is still the one promoted.

    Returns:
        The alias record; ``record["version"]`` is the version to load.

    Raises:
        AliasNotFoundError: The alias was never promoted.
        IntegrityError: The version's manifest changed since promotion.
    """
    store = _open_store(store_uri, storage_options)
    try:
        record, _ = _read_json(store, store.alias_path(model, alias))
    except FileNotFoundError:
        raise AliasNotFoundError(
            f"{model} has no alias {alias!r} in {store.uri}; promote a version first"
        ) from None
    _, data = _load_manifest(store, model, record["version"])
    if hashlib.sha256(data).hexdigest() != record["manifest_sha256"]:
        raise IntegrityError(
            f"{model}/{record['version']}: manifest changed since it was promoted to {alias!r}; "
            f"verify the version and promote again"
        )
    return record
