"""Artifact store: publish, verify, pull and promote model versions under an fsspec URI.

Layout: ``<store>/<model>/versions/<version>/{manifest.json, ...}`` and, per alias, an append-only log
``<store>/<model>/aliases/<alias>/<NNNNNN>.json`` whose newest generation is the alias's target.
A version is visible only once its ``manifest.json`` exists; the manifest is written last, create-only.
Usage: ``publish("s3://bucket/models", "tiny-lora", {"adapter": Path("out/adapter")})``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from core.errors import DeltatuneError
from core.fsutil import create_temp_file, fsync_path, fsync_tree, make_temp_dir
from core.names import check_name, is_safe_name
from core.secretkeys import WHERE_INSTEAD, find_secrets, redact, safe_uri, scrub, value_problem

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
_RESERVED = {MANIFEST_NAME, STAGING_DIR, CLAIM_NAME}
_LOCAL_PROTOCOLS = {"file", "local"}


class StoreError(DeltatuneError):
    """Base class for artifact store errors. ``retryable`` says whether the same call may succeed later."""


class StoreUnavailableError(StoreError):
    """The store could not be reached or its root does not exist."""

    retryable = True


class VersionExistsError(StoreError):
    """The version already has a manifest: published versions are immutable."""


class VersionNotFoundError(StoreError):
    """No visible (manifest-bearing) version of that name exists."""


class AliasNotFoundError(StoreError):
    """The alias has never been promoted."""


class AliasConflictError(StoreError):
    """Another promotion or rollback moved the alias after this one read it (a lost compare-and-swap).

    Not retried blindly: the alias now points somewhere this promotion did not look at; re-read it
    and decide again (the gates may judge differently against the new target)."""


class IntegrityError(StoreError):
    """A stored file is missing or its size / sha256 differs from the manifest."""


class PublishError(StoreError):
    """A publish stopped part-way; the version stays invisible and the same call resumes it."""

    retryable = True

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


def _check_alias(alias: str) -> str:
    check_name("alias", alias)
    if _AUTO_VERSION.match(alias):
        # MODEL@NAME names an alias or a version: automatic version names stay unambiguous.
        raise ValueError(
            f"invalid alias {alias!r}: names like v0001 are automatic version names; choose e.g. "
            "'production' or 'staging'"
        )
    return alias


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
    """The URI without ``user:password@`` or signed query values, so it can be logged or raised."""
    return safe_uri(uri)


def _check_metadata(metadata: Any, where: str = "metadata") -> None:
    """Refuse manifest metadata holding a credential (core/secretkeys.py's rule), naming where it is."""
    if found := find_secrets(metadata):
        places = "; ".join(f"{where}{_brackets(f.path)}: {f.reason}" for f in found)
        raise ValueError(
            f"{places}: a manifest is readable by anyone with store access, so it must hold no credentials; "
            f"remove them ({WHERE_INSTEAD}; storage_options for the store's own)"
        )


def _brackets(path: str) -> str:
    """``auth.token`` / ``a[0].b`` as ``['auth']['token']`` / ``['a'][0]['b']``."""
    out = []
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        out.append(part if part.startswith("[") else f"[{part!r}]")
    return "".join(out)


# ----------------------------------------------------------------------------- filesystem helpers


@dataclass(frozen=True)
class _Store:
    fs: fsspec.AbstractFileSystem
    root: str
    uri: str  # safe for logs
    # To scrub credentials from third-party error messages (core.secretkeys.scrub); never logged.
    options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        protocols = {protocol} if isinstance(protocol, str) else set(protocol)
        return bool(protocols & _LOCAL_PROTOCOLS)

    def model_dir(self, model: str) -> str:
        return f"{self.root}/{check_name('model name', model)}"

    def version_dir(self, model: str, version: str) -> str:
        return f"{self.model_dir(model)}/versions/{check_name('version', version)}"

    def alias_dir(self, model: str, alias: str) -> str:
        return f"{self.model_dir(model)}/aliases/{_check_alias(alias)}"

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
    if (why := value_problem(store_uri)) is not None:
        # The URI is logged, raised and recorded in manifests and alias records (as ``uri``).
        raise ValueError(
            f"artifact store URI {safe} holds credentials ({why}); remove them from the URI: "
            f"{WHERE_INSTEAD}, or storage_options when calling the store from Python"
        )
    protocol = store_uri.split("://", 1)[0] if "://" in store_uri else "file"
    if protocol not in _LOCAL_PROTOCOLS:
        # Several publishers share one store: a cached listing would hide their versions and claims.
        options.setdefault("use_listings_cache", False)
    logger.debug("opening artifact store %s with storage_options=%s", safe, redact(options))
    try:
        fs, root = url_to_fs(store_uri, **options)
    except (ImportError, ValueError) as exc:
        raise StoreUnavailableError(
            f"cannot open artifact store {safe}: {scrub(str(exc), options)}"
        ) from None
    store = _Store(fs=fs, root=root.rstrip("/") or root, uri=safe, options=options)
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
                f"artifact store {store.uri}: access denied to {path!r} ({scrub(str(exc), store.options)})"
            ) from None
        except Exception as exc:  # network errors come in many types (botocore, aiohttp, OSError)
            raise StoreUnavailableError(
                f"cannot reach artifact store {store.uri} ({type(exc).__name__}: {scrub(str(exc), store.options)}); check the "
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
        # With the process umask like any other file (mkstemp makes 0600: other users of a shared
        # store could list manifests, claims and aliases but not read them, so not verify).
        fd, tmp = create_temp_file(parent, ".tmp-")
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
    """Upload one file (single PUT or multipart on S3). Separate so tests can interrupt a publish.

    On S3 a file of two parts or more goes up as a multipart upload of ``default_block_size`` parts
    (an s3fs option, 50 MiB by default). s3fs aborts a failed multipart upload itself, but that abort
    is one more request to a store that has just failed: if it fails too, the parts stay stored (and
    billed) until someone aborts them. So any failure here also aborts what is left under this key.
    """
    if store.is_local:
        store.fs.makedirs(store.fs._parent(remote), exist_ok=True)
        store.fs.put_file(str(local), remote)
        return
    try:
        store.fs.put_file(str(local), remote, **_part_size(store, local.stat().st_size))
    except Exception:
        _abort_multipart(store, remote, exact=True)
        raise


# S3 allows at most 10,000 parts per upload.
_MAX_PARTS = 10_000


def _part_size(store: _Store, size: int) -> dict[str, int]:
    block = getattr(store.fs, "default_block_size", None)
    if not isinstance(block, int) or block <= 0:
        return {}
    return {"chunksize": max(block, -(-size // _MAX_PARTS))}


def _s3_key(store: _Store, path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _multipart_uploads(store: _Store, prefix_path: str) -> list[dict[str, Any]]:
    """Unfinished multipart uploads whose key starts with ``prefix_path`` (S3 only; [] elsewhere)."""
    if store.is_local or not hasattr(store.fs, "call_s3"):
        return []
    bucket, prefix = _s3_key(store, prefix_path)
    found: list[dict[str, Any]] = []
    markers: dict[str, str] = {}
    while True:
        page = store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
        found += [{**u, "Bucket": bucket} for u in page.get("Uploads") or []]
        if not page.get("IsTruncated"):
            return found
        markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def _abort_multipart(store: _Store, prefix_path: str, *, exact: bool = False) -> list[dict[str, Any]]:
    """Abort every unfinished multipart upload under ``prefix_path`` (``exact``: of that key only);
    never raises (``gc`` catches what is left), returns what was aborted."""
    aborted = []
    key = _s3_key(store, prefix_path)[1]
    try:
        for u in _multipart_uploads(store, prefix_path):
            if exact and u["Key"] != key:
                continue
            store.fs.call_s3(
                "abort_multipart_upload", Bucket=u["Bucket"], Key=u["Key"], UploadId=u["UploadId"]
            )
            aborted.append(u)
    except Exception as exc:
        logger.warning(
            "could not abort unfinished multipart uploads under %s (%s: %s); `deltatune gc` removes them later",
            prefix_path,
            type(exc).__name__,
            exc,
        )
    for u in aborted:
        logger.info("aborted unfinished multipart upload of %s", u["Key"])
    return aborted


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
    content_key: str | None = None,
) -> PublishResult:
    """Upload local files as one immutable version and make it visible by writing its manifest last.

    Every publish claims its version with a create-only ``.claim`` holding a fresh token. Re-running
    with the ``version`` and ``resume_token`` of a failed attempt (both on its ``PublishError``)
    resumes it: files whose staged sha256 and remote size match are skipped; if that attempt had in
    fact written the manifest, the published version is returned as is. Without the token, a claimed
    or published version is refused. The manifest is created with a create-only write (S3
    ``IfNoneMatch="*"``, local hard link), so two publishers cannot both publish one version.

    A resumed publish recognises the version its earlier attempt finished by its content key when it
    has one: a run that re-ran an upstream stage produces the same model with other timings in
    ``eval.json`` or ``train_summary.json``, and that version, whole and claimed with this token, is
    returned as is. Without a content key the files and metadata must match exactly.

    Args:
        store_uri: Store root: a local path, ``file://`` URI or ``s3://bucket/prefix``.
        model: Model name (letters, digits, ``._-``).
        sources: Destination path inside the version -> local file or directory,
            e.g. ``{"adapter": Path("out/adapter"), "eval.json": Path("out/eval.json")}``.
        version: Version name; ``None`` claims the next automatic ``v0001``, ``v0002``, ...
        metadata: JSON-serialisable extra fields for the manifest (no secrets).
        storage_options: Passed to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        resume_token: The ``token`` of a failed attempt's ``PublishError``, with its ``version``.
        content_key: What the version's content is a function of (e.g. a hash of config, data and
            base model); stored as ``metadata["content_key"]``. Passing it as ``metadata["content_key"]``
            alone is the same; passing both with different values is a ValueError.

    Returns:
        A ``PublishResult`` with the version, its URI, the manifest sha256, the files moved this run
        and the claim token.

    Raises:
        VersionExistsError: ``version`` already has a manifest, or another publish claimed it.
        PublishError: An upload failed; ``version`` and ``token`` on it resume the publish.
        FileNotFoundError, ValueError: Bad sources, names or metadata.
        StoreUnavailableError: The store cannot be reached.
    """
    check_name("model name", model)
    if version is not None:
        check_name("version", version)
    metadata = dict(metadata or {})
    if content_key is not None:
        if metadata.setdefault("content_key", content_key) != content_key:
            raise ValueError(
                f"content_key={content_key!r} differs from metadata['content_key']="
                f"{metadata['content_key']!r}; pass one value"
            )
    content_key = metadata.get("content_key")
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
        return _published_as_is(store, model, version, entries, metadata, token, content_key)
    vdir = store.version_dir(model, version)
    if resume_token is not None:
        _abort_multipart(store, f"{vdir}/")  # parts of an upload the failed attempt never finished
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
            return _published_as_is(store, model, version, entries, metadata, token, content_key)
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
    store: _Store,
    model: str,
    version: str,
    entries: list[FileEntry],
    metadata: dict,
    token: str,
    content_key: str | None,
) -> PublishResult:
    """The result of a publish that an earlier attempt with this token already finished.

    With a content key, the version is ours when its manifest carries the same key: its files may
    differ from ours only in volatile parts (timings of a stage that re-ran), and the stored version
    is whole. Without one, the manifest must list exactly these files and metadata: else the sources
    changed since, and that is an error.
    """
    manifest, data = _read_json(store, f"{store.version_dir(model, version)}/{MANIFEST_NAME}")
    listed = [
        FileEntry(**f) for f in manifest.get("files", []) if isinstance(f, dict) and f.keys() == _ENTRY_KEYS
    ]
    stored_meta = manifest.get("metadata")
    if content_key is not None and isinstance(stored_meta, dict):
        ours = stored_meta.get("content_key") == content_key
    else:
        ours = listed == entries and stored_meta == metadata
    if not ours:
        raise VersionExistsError(
            f"{model}/{version} was published by another run, or by an earlier attempt with other "
            "files or metadata than these; its files may be mixed: run verify_version on it, and "
            "publish this run as a new version"
        )
    if listed != entries:
        stored, local = {e.path: e for e in listed}, {e.path: e for e in entries}
        differ = sorted(p for p in stored.keys() | local.keys() if stored.get(p) != local.get(p))
        logger.info(
            "%s/%s was published by an earlier attempt of this run (content key %s); local files differ "
            "only in volatile parts (%s): keeping the stored version",
            model,
            version,
            content_key,
            ", ".join(differ) or "metadata",
        )
    else:
        logger.info("%s/%s was already published by an earlier attempt; nothing to do", model, version)
    return _published(store, model, version, listed, data, token, [], [e.path for e in listed])


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


def manifest_sha256(
    store_uri: str, model: str, version: str, *, storage_options: Mapping[str, Any] | None = None
) -> str:
    """The sha256 of a published version's ``manifest.json`` bytes: what an alias records, and what a
    cached publish result can be checked against (a version is immutable, so the same hash means the
    same files).

    Raises:
        VersionNotFoundError: The version has no manifest.
    """
    _, data = _load_manifest(_open_store(store_uri, storage_options), model, version)
    return hashlib.sha256(data).hexdigest()


def _check_entry(model: str, version: str, entry: Mapping[str, Any], size: int, sha: str, where: str) -> None:
    if (size, sha) != (entry["size"], entry["sha256"]):
        raise IntegrityError(
            f"{model}/{version}: {where} {entry['path']!r} does not match the manifest (size {size} vs "
            f"{entry['size']}, sha256 {sha[:12]}… vs {entry['sha256'][:12]}…); the stored copy was "
            f"altered: re-publish as a new version"
        )


def _verify(store: _Store, model: str, version: str) -> tuple[dict[str, Any], bytes]:
    manifest, data = _load_manifest(store, model, version)
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
        _check_entry(model, version, entry, size, sha, "stored")
    logger.info("verified %s (%d files)", store.version_uri(model, version), len(manifest["files"]))
    return manifest, data


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
    return _verify(_open_store(store_uri, storage_options), model, version)[0]


class VersionReader:
    """Reads single files of one model's published versions, each checked against its manifest.

    Handed to a promotion's ``check`` (see ``promote``) so that gates read their evidence (``eval.json``,
    ``merge_report.json``, the adapter) from the very versions being compared.
    """

    def __init__(self, store: _Store, model: str):
        self._store = store
        self.model = model
        self._manifests: dict[str, dict[str, Any]] = {}

    def manifest(self, version: str) -> dict[str, Any]:
        """The manifest of a published version (``VersionNotFoundError`` if it has none)."""
        if version not in self._manifests:
            self._manifests[version] = _load_manifest(self._store, self.model, version)[0]
        return self._manifests[version]

    def paths(self, version: str) -> list[str]:
        """Every file path the version's manifest lists."""
        return [e["path"] for e in self.manifest(version)["files"]]

    def read(self, version: str, path: str) -> bytes | None:
        """The bytes of ``path`` in ``version``; None if the manifest does not list it.

        Raises:
            IntegrityError: The stored file is missing or differs from the manifest.
        """
        entry = next((e for e in self.manifest(version)["files"] if e["path"] == path), None)
        if entry is None:
            return None
        try:
            data = self._store.fs.cat_file(f"{self._store.version_dir(self.model, version)}/{path}")
        except FileNotFoundError:
            raise IntegrityError(
                f"{self.model}/{version}: {path!r} is listed in the manifest but missing from {self._store.uri}"
            ) from None
        _check_entry(self.model, version, entry, len(data), hashlib.sha256(data).hexdigest(), "stored")
        return data

    def read_json(self, version: str, path: str) -> Any:
        """``read`` parsed as JSON (None if not listed)."""
        data = self.read(version, path)
        return None if data is None else json.loads(data)


def _check_dest(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(
            f"destination {dest} exists and is not an empty directory; pull into a new or empty directory"
        )


def _download(
    store: _Store, model: str, version: str, dest: Path, *, expect_manifest: str | None = None
) -> tuple[dict[str, Any], str]:
    """Download a version into a temp dir beside ``dest``, check every file, then rename it to ``dest``:
    on any failure nothing is left at ``dest``. Returns the manifest and its sha256."""
    _check_dest(dest)
    manifest, data = _load_manifest(store, model, version)
    sha = hashlib.sha256(data).hexdigest()
    if expect_manifest is not None and sha != expect_manifest:
        raise IntegrityError(
            f"{model}/{version}: manifest changed since it was promoted (sha256 {sha[:12]}… vs "
            f"{expect_manifest[:12]}…); nothing was downloaded; verify the version and promote again"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, f".{dest.name}.tmp-")
    vdir = store.version_dir(model, version)
    try:
        for entry in manifest["files"]:
            local = tmp / _check_relpath(entry["path"])
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                store.fs.get_file(f"{vdir}/{entry['path']}", str(local))
            except FileNotFoundError:
                raise IntegrityError(
                    f"{model}/{version}: {entry['path']!r} is missing from {store.uri}; nothing was "
                    "downloaded"
                ) from None
            _check_entry(model, version, entry, *hash_file(local), "downloaded")
        (tmp / MANIFEST_NAME).write_bytes(data)
        fsync_tree(tmp)
        os.replace(tmp, dest)  # POSIX rename also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(dest.parent)
    logger.info("downloaded %s to %s", store.version_uri(model, version), dest)
    return manifest, sha


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
        dest_dir: Local directory that does not exist yet or is empty. The manifest is copied in too.
        storage_options: Passed to fsspec.

    Returns:
        ``dest_dir`` as a ``Path``.

    Raises:
        IntegrityError: A file is missing or differs from the manifest; ``dest_dir`` is left as it was.
        ValueError: ``dest_dir`` exists and is not an empty directory.
    """
    dest = Path(dest_dir)
    _download(_open_store(store_uri, storage_options), model, version, dest)
    return dest


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``MODEL@ALIAS`` or ``MODEL@VERSION`` into its two names (checked)."""
    model, sep, name = str(ref).partition("@")
    if not sep:
        raise ValueError(
            f"invalid reference {ref!r}: expected MODEL@ALIAS or MODEL@VERSION, e.g. "
            "tiny-lora@production or tiny-lora@v0003"
        )
    return check_name("model name", model), check_name("alias or version", name)


def pull(
    store_uri: str,
    ref: str,
    dest: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Download the version ``ref`` names into ``dest``, every file checked against its sha256.

    ``ref`` is ``MODEL@ALIAS`` (the alias's current target, whose manifest must still be the one
    promoted) or ``MODEL@VERSION``. A name that is both an alias and an explicit version name is
    refused as ambiguous. The files land in a temp dir beside ``dest``, renamed to ``dest`` once all
    match: a failed pull leaves no partial ``dest``.

    Returns:
        ``{"model", "version", "alias", "dest", "files", "manifest_sha256"}`` (``alias`` None for a
        version reference).

    Raises:
        ValueError: A bad reference, or ``dest`` exists and is not an empty directory.
        AliasNotFoundError / VersionNotFoundError: Neither an alias nor a version of that name; or the
            alias's target is no longer published.
        IntegrityError: A file or the target's manifest differs from what was recorded.
    """
    model, name = parse_ref(ref)
    dest = Path(dest)
    _check_dest(dest)
    store = _open_store(store_uri, storage_options)
    state = _alias_state(store, model, name) if not _AUTO_VERSION.match(name) else None
    alias, expect = None, None
    if state is not None and state.generation:
        if store.fs.exists(f"{store.version_dir(model, name)}/{MANIFEST_NAME}"):
            raise ValueError(
                f"{model}@{name} is ambiguous: {name!r} is both an alias and a version of {model}; pull "
                f"the version the alias points at ({model}@{state.version}) instead"
            )
        _check_target(store, state)
        alias, version, expect = name, state.version, state.record["manifest_sha256"]
    else:
        version = name
        try:
            _load_manifest(store, model, version)
        except VersionNotFoundError as exc:
            if state is None:
                raise
            raise VersionNotFoundError(
                f"{model} has neither an alias nor a version {name!r}: {exc}"
            ) from None
    manifest, sha = _download(store, model, version, dest, expect_manifest=expect)
    return {
        "model": model,
        "version": version,
        "alias": alias,
        "dest": str(dest),
        "files": len(manifest["files"]),
        "manifest_sha256": sha,
    }


def describe_versions(
    store_uri: str, model: str, *, storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per visible version (oldest first) for ``deltatune versions``.

    Returns:
        Dicts of ``version``, ``created_at``, ``method``, ``exact_match`` and ``loss`` (tuned, from the
        manifest's ``metadata.eval``), ``max_logit_gap`` (``metadata.merge``) and ``aliases`` (the
        aliases whose current target it is); a value the manifest does not carry is None.
    """
    store = _open_store(store_uri, storage_options)
    targets: dict[str, list[str]] = {}
    for alias, record in _current_aliases(store, model).items():
        targets.setdefault(record.get("version"), []).append(alias)
    rows = []
    for version in sorted(_version_dirs(store, model), key=_version_sort_key):
        try:
            manifest, _ = _load_manifest(store, model, version)
        except VersionNotFoundError:
            continue  # an unfinished publish
        meta = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
        tuned = _get(meta, "eval", "tuned")
        rows.append(
            {
                "version": version,
                "created_at": manifest.get("created_at"),
                "method": meta.get("method"),
                "exact_match": _get(tuned, "exact_match"),
                "loss": _get(tuned, "loss"),
                "max_logit_gap": _get(meta, "merge", "max_logit_gap"),
                "aliases": sorted(targets.get(version, [])),
            }
        )
    return rows


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


# ----------------------------------------------------------------------------- aliases
#
# Each alias is an append-only log of generation records, ``aliases/<alias>/000001.json``, ...; the
# newest is the alias's target. Promoting writes generation N+1 with a create-only write (S3
# ``IfNoneMatch="*"``, a hard link locally), so of two promotions that read generation N exactly one
# commits and the other gets AliasConflictError: a compare-and-swap whose log is also the promotion
# history, its from -> to chain unbroken by construction. The pre-release single-file layout
# (``aliases/<alias>.json``) is not read.

ALIAS_FORMAT = 1
_GENERATION = re.compile(r"^(\d+)\.json$")


@dataclass(frozen=True)
class AliasState:
    """An alias as read at one moment: the compare of the compare-and-swap.

    ``generation`` 0 and ``record`` None: never promoted.
    """

    model: str
    alias: str
    generation: int
    record: dict[str, Any] | None

    @property
    def version(self) -> str | None:
        return self.record["version"] if self.record else None


def _generations(store: _Store, model: str, alias: str) -> list[int]:
    try:
        names = store.fs.ls(store.alias_dir(model, alias), detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(
        int(m.group(1)) for n in names if (m := _GENERATION.match(n.rstrip("/").rsplit("/", 1)[-1]))
    )


def _generation_path(store: _Store, model: str, alias: str, generation: int) -> str:
    return f"{store.alias_dir(model, alias)}/{generation:06d}.json"


def _read_generation(store: _Store, model: str, alias: str, generation: int) -> dict[str, Any]:
    path = _generation_path(store, model, alias, generation)
    try:
        record, _ = _read_json(store, path)
    except ValueError:
        raise IntegrityError(
            f"alias {alias!r} of {model}: generation {generation} is not JSON ({path})"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("version"), str):
        raise IntegrityError(f"alias {alias!r} of {model}: generation {generation} has no version ({path})")
    return record


def _alias_state(store: _Store, model: str, alias: str) -> AliasState:
    generations = _generations(store, model, alias)
    if not generations:
        return AliasState(model, alias, 0, None)
    newest = generations[-1]
    return AliasState(model, alias, newest, _read_generation(store, model, alias, newest))


def _current_aliases(store: _Store, model: str) -> dict[str, dict[str, Any]]:
    try:
        entries = store.fs.ls(f"{store.model_dir(model)}/aliases", detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e["type"] == "directory" and is_safe_name(name) and not _AUTO_VERSION.match(name):
            state = _alias_state(store, model, name)
            if state.record is not None:
                out[name] = state.record
    return out


def _check_target(store: _Store, state: AliasState) -> None:
    """The alias's target is still published with the manifest it was promoted with."""
    assert state.record is not None
    version = state.version
    try:
        _, data = _load_manifest(store, state.model, version)
    except VersionNotFoundError:
        raise VersionNotFoundError(
            f"alias {state.alias!r} of {state.model} points at {version}, which is no longer published in "
            f"{store.uri} (its manifest is gone); promote another version or roll back"
        ) from None
    if hashlib.sha256(data).hexdigest() != state.record["manifest_sha256"]:
        raise IntegrityError(
            f"{state.model}/{version}: manifest changed since it was promoted to {state.alias!r}; "
            "verify the version and promote again"
        )


def _actor() -> str:
    if actor := os.environ.get("DELTATUNE_ACTOR"):
        return actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _transport_error(exc: BaseException) -> bool:
    """A network or access failure (which type depends on the backend: botocore, aiohttp, OSError)."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    root = type(exc).__module__.split(".", 1)[0]
    return isinstance(exc, (OSError, TimeoutError)) or root in {
        "botocore",
        "aiobotocore",
        "aiohttp",
        "urllib3",
    }


def _unreachable(store: _Store, doing: str, exc: BaseException, after: str) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"{doing} on {store.uri} failed ({type(exc).__name__}: {exc}); {after}. Check the endpoint, the "
        "network and the credentials in the environment, and try again"
    )


def _append(
    store: _Store,
    state: AliasState,
    version: str,
    manifest: bytes,
    *,
    action: str,
    gates: list[dict[str, Any]],
    forced: bool,
) -> dict[str, Any]:
    """Write generation N+1 of the alias, create-only: the swap of the compare-and-swap."""
    generation = state.generation + 1
    record = {
        "format": ALIAS_FORMAT,
        "model": state.model,
        "alias": state.alias,
        "generation": generation,
        "action": action,
        "version": version,
        "previous": state.version,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "gates": gates,
        "forced": forced,
        "promoted_by": _actor(),
        "promoted_at": _now(),
        "id": uuid.uuid4().hex,
    }
    _check_metadata(record, "alias record")
    path = _generation_path(store, state.model, state.alias, generation)
    doing = "promotion" if action == "promote" else action
    try:
        _put_bytes(store, path, _dumps(record), create_only=True)
    except FileExistsError:
        try:
            winner = _read_generation(store, state.model, state.alias, generation)
        except Exception:
            winner = {}
        if winner.get("id") == record["id"]:
            return winner  # our own write, whose reply was lost: the client retried and met it
        try:
            now = _alias_state(store, state.model, state.alias).version
        except Exception:
            now = winner.get("version")
        raise AliasConflictError(
            f"alias {state.alias!r} of {state.model} moved from {state.version or 'nothing'} to {now} while "
            f"this {doing} was deciding; re-read it (deltatune versions {state.model}) and retry"
        ) from None
    except Exception as exc:
        if not _transport_error(exc):
            raise
        raise _unreachable(
            store,
            f"recording the {doing} of {state.model}/{version} to {state.alias!r}",
            exc,
            f"the alias may or may not have moved: `deltatune versions {state.model}` shows its target",
        ) from exc
    logger.info(
        "alias %r of %s: %s -> %s (generation %d, %s%s)",
        state.alias,
        state.model,
        state.version,
        version,
        generation,
        action,
        ", forced" if forced else "",
    )
    return record


# What a promotion checks between reading the alias and writing its next generation: the gate records
# to store with it (see core/promotion.py), or an exception that refuses the promotion.
Check = Callable[[AliasState, VersionReader], Sequence[Mapping[str, Any]]]


def alias_state(
    store_uri: str, model: str, alias: str, *, storage_options: Mapping[str, Any] | None = None
) -> AliasState:
    """Read an alias's newest generation (``generation`` 0 when it was never promoted)."""
    return _alias_state(_open_store(store_uri, storage_options), model, alias)


def promote(
    store_uri: str,
    model: str,
    version: str,
    alias: str,
    *,
    check: Check | None = None,
    forced: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Point ``alias`` at a published version by compare-and-swap on the alias's log.

    In order: read the alias (generation N), re-hash every file of the version against its manifest,
    run ``check`` (the gates) on what was read, then write generation N+1 create-only. A promotion that
    read the same generation N as another and lost the write gets ``AliasConflictError``; the alias
    never points at a version whose files were not all verified.

    Args:
        store_uri: Store root.
        model: Model name.
        version: A published version.
        alias: Alias name, e.g. ``"production"`` (not a ``v0001``-style version name).
        check: ``check(state, reader)`` returns the gate records to store (JSON, no secrets) or raises
            to refuse; ``reader`` reads files of this model's versions, checked against their manifests.
        forced: Recorded on the generation: the promotion went ahead although a gate failed.
        storage_options: Passed to fsspec.

    Returns:
        The generation record: ``generation``, ``version``, ``previous``, ``manifest_sha256``,
        ``gates``, ``forced``, ``action`` ("promote"), ``promoted_by``, ``promoted_at``.

    Raises:
        VersionNotFoundError: The version has no manifest.
        IntegrityError: A file of the version is missing or altered.
        AliasConflictError: The alias moved after it was read.
        StoreUnavailableError: The store cannot be reached; the alias is unchanged (or, if the reply
            to the final write was lost, says so).
    """
    check_name("model name", model)
    check_name("version", version)
    _check_alias(alias)
    store = _open_store(store_uri, storage_options)
    try:
        state = _alias_state(store, model, alias)
        _, data = _verify(store, model, version)
        gates = [dict(g) for g in check(state, VersionReader(store, model))] if check else []
    except Exception as exc:
        if not _transport_error(exc):
            raise
        raise _unreachable(
            store, f"promoting {model}/{version} to {alias!r}", exc, "the alias is unchanged"
        ) from exc
    return _append(store, state, version, data, action="promote", gates=gates, forced=forced)


def rollback(
    store_uri: str, model: str, alias: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Point ``alias`` back at the version it pointed at before its current target.

    Written as a new generation (``action`` "rollback") by the same compare-and-swap as ``promote``,
    after re-hashing every file of that version. As ``kubectl rollout undo``, a second rollback undoes
    the first.

    Returns:
        The new generation record.

    Raises:
        AliasNotFoundError: The alias was never promoted.
        StoreError: The alias has had one target only.
        VersionNotFoundError / IntegrityError: The previous target is gone or altered.
        AliasConflictError: The alias moved while rolling back.
        StoreUnavailableError: The store cannot be reached.
    """
    _check_alias(alias)
    store = _open_store(store_uri, storage_options)
    try:
        state = _alias_state(store, model, alias)
        if state.record is None:
            raise AliasNotFoundError(f"{model} has no alias {alias!r} in {store.uri}; nothing to roll back")
        target = state.record.get("previous")
        if not target:
            raise StoreError(
                f"alias {alias!r} of {model} has pointed at {state.version} only; there is nothing to roll "
                "back to: promote another version instead"
            )
        _, data = _verify(store, model, target)
    except Exception as exc:
        if not _transport_error(exc):
            raise
        raise _unreachable(
            store, f"rolling back {alias!r} of {model}", exc, "the alias is unchanged"
        ) from exc
    return _append(store, state, target, data, action="rollback", gates=[], forced=False)


def resolve_alias(
    store_uri: str, model: str, alias: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Read an alias's current generation and check that its version is still the one promoted.

    Returns:
        The generation record; ``record["version"]`` is the version to load.

    Raises:
        AliasNotFoundError: The alias was never promoted.
        VersionNotFoundError: The target was deleted since.
        IntegrityError: The target's manifest changed since it was promoted.
    """
    store = _open_store(store_uri, storage_options)
    state = _alias_state(store, model, alias)
    if state.record is None:
        raise AliasNotFoundError(f"{model} has no alias {alias!r} in {store.uri}; promote a version first")
    _check_target(store, state)
    return state.record


def alias_history(
    store_uri: str, model: str, alias: str, *, storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every generation of an alias, oldest first: the promotion log (each ``previous`` is the
    ``version`` of the record before it)."""
    store = _open_store(store_uri, storage_options)
    return [_read_generation(store, model, alias, g) for g in _generations(store, model, alias)]


def list_aliases(
    store_uri: str, model: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Every alias of a model and its current generation record (targets not re-checked)."""
    return _current_aliases(_open_store(store_uri, storage_options), model)


# ----------------------------------------------------------------------------- gc


def _mtime(info: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "Initiated", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
    return None


def gc(
    store_uri: str,
    *,
    older_than_s: float,
    storage_options: Mapping[str, Any] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Remove what interrupted publishes left: unfinished S3 multipart uploads under the store's
    prefix, and claim-only versions (a ``.claim``, no manifest), both older than ``older_than_s``.

    A claim-only version's age is that of its newest file, so a publish that is still uploading (or
    was resumed lately) is kept. A version with a manifest is never touched, nor is a directory
    without a claim (not a deltatune publish). Choose an age well above the longest pause between a
    failed publish and its resume: after gc, that resume starts its version afresh.

    Returns:
        ``{"multipart_uploads": [{"key", "initiated"}], "claims": [{"model", "version",
        "last_modified"}], "dry_run"}``: what was removed (or, with ``dry_run``, would be).
    """
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    store = _open_store(store_uri, storage_options)
    cutoff = time.time() - older_than_s
    uploads = [u for u in _multipart_uploads(store, f"{store.root}/") if (_mtime(u) or cutoff) < cutoff]
    for u in uploads if not dry_run else []:
        store.fs.call_s3("abort_multipart_upload", Bucket=u["Bucket"], Key=u["Key"], UploadId=u["UploadId"])
    claims = []
    for model in _model_names(store):
        for version in _version_dirs(store, model):
            vdir = store.version_dir(model, version)
            if store.fs.exists(f"{vdir}/{MANIFEST_NAME}") or not store.fs.exists(f"{vdir}/{CLAIM_NAME}"):
                continue
            infos = store.fs.find(vdir, detail=True).values()
            times = [t for i in infos if (t := _mtime(i)) is not None]
            if not times or max(times) >= cutoff:
                continue
            claims.append(
                {
                    "model": model,
                    "version": version,
                    "last_modified": datetime.fromtimestamp(max(times), timezone.utc).isoformat(
                        timespec="seconds"
                    ),
                }
            )
            if not dry_run:
                _remove_claimed(store, vdir, [i["name"] for i in infos])
    logger.info(
        "gc of %s: %s %d multipart uploads and %d claim-only versions older than %gs",
        store.uri,
        "would remove" if dry_run else "removed",
        len(uploads),
        len(claims),
        older_than_s,
    )
    return {
        "multipart_uploads": [{"key": u["Key"], "initiated": str(u.get("Initiated"))} for u in uploads],
        "claims": claims,
        "dry_run": dry_run,
    }


def _model_names(store: _Store) -> list[str]:
    try:
        entries = store.fs.ls(store.root, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
    return sorted(n for n in names if is_safe_name(n))


def _remove_claimed(store: _Store, vdir: str, paths: list[str]) -> None:
    """Remove a claim-only version: its files first, the claim last, so that a publisher resuming at
    this very moment re-claims and re-uploads rather than trusting half-removed files."""
    if store.fs.exists(f"{vdir}/{MANIFEST_NAME}"):
        return  # published after all, between the listing and now
    claim = f"{vdir}/{CLAIM_NAME}"
    files = sorted(p for p in paths if p.rstrip("/") != claim)
    if files:
        store.fs.rm(files)
    _remove_quietly(store, vdir, recursive=True)
