"""The one rule for what counts as a credential: refused in run configs (core/config.py), in flow
parameters (flows/finetune.py's ``Override``/``ConfigRef``), in what a version publishes (core/publish.py,
the manifest metadata in core/store.py), and masked wherever options or URIs are logged (core/store.py).

    find_secrets({"publish": {"store": "s3://AKIA...:x@bucket"}})   # [Finding("publish.store", "...")]
    value_problem("https://host/f?X-Amz-Signature=...")              # "a signed-URL ... (X-Amz-Signature)"
    redact(options) / safe_uri(uri)                                  # what may be logged

A credential is (docs/secrets.md):
- a key that names one (``secret``, ``token``, ``password``, ``api_key``, ``access_key``, SSE-C's
  ``SSECustomerKey``, ``Authorization``, a bare ``key``...) holding a value;
- a user or password before ``@`` in any URL (``s3://AKIA:secret@bucket``, ``https://u:p@host``);
- a query parameter of a signed URL or token (S3 ``X-Amz-Signature``/``X-Amz-Credential``/
  ``X-Amz-Security-Token``, ``AWSAccessKeyId``+``Signature``, GCS ``X-Goog-Signature``/``GoogleAccessId``,
  Azure SAS ``sig``/``se``/``sp``, ``token=``, ``access_token=``, ``key=``);
- a value shaped like a well-known credential (an AWS access key id, a Hugging Face or GitHub token,
  a PEM private key, a JWT).
No message built here ever contains the value: only where it is and what kind of thing it looks like.
The regexes are written once and used both by Python (``re``) and, for flow parameters, as JSON-schema
patterns that Prefect's server checks (Python ``re`` there, ECMAScript in a browser): so they use no
inline flags and no look-behind, and case-insensitivity is spelled out by ``_ci``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

# Where credentials go instead; every refusal ends with this.
WHERE_INSTEAD = (
    "pass credentials through the environment of the process or worker (AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, HF_TOKEN), an instance role, or a Kubernetes Secret exposed as "
    "env (docs/secrets.md)"
)


def _ci(source: str) -> str:
    """The regex ``source`` made case-insensitive without flags: each letter outside ``[...]`` and
    escapes becomes ``[xX]`` (JSON-schema patterns have no flags; ECMAScript has no ``(?i)``)."""
    out, i, in_class = [], 0, False
    while i < len(source):
        c = source[i]
        if c == "\\":
            out.append(source[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
            out.append(c)
        elif c == "[":
            in_class = True
            out.append(c)
        elif c.isalpha() and c.isascii():
            out.append(f"[{c.lower()}{c.upper()}]")
        else:
            out.append(c)
        i += 1
    return "".join(out)


# Words that make a key name (a storage option, a metadata field, a query parameter) a credential.
# Substrings, so camelCase and snake_case both match (SSECustomerKey, aws_secret_access_key); "tokens"
# and "tokenizer" are not tokens (eval.max_new_tokens, model.tokenizer).
_KEY_WORDS = _ci(
    r"secret|passw(?:or)?d|passphrase|credential|signature|cookie|authorization|bearer|token(?!s|iz)"
    r"|(?:api|access|account|customer|private|signing|session|master|encryption)[-_.]?key"
)
# Names that are credentials only as a whole (s3fs' ``key``, ``auth``, Azure SAS ``sig``).
_BARE_KEYS = _ci(r"key|auth|sig|pwd|pass")
# Query parameters of signed URLs not caught by _KEY_WORDS: Azure SAS (sig, expiry se, permissions sp,
# user-delegation skoid/sktid) and GCS V2 (GoogleAccessId).
_QUERY_NAMES = _ci(r"sig|se|sp|skoid|sktid|googleaccessid|key")

SECRET_KEY = re.compile(rf"{_KEY_WORDS}|^(?:{_BARE_KEYS})$")

# scheme://<anything but / ? # or space>@ : userinfo (a user, or user:password) in the authority.
_USERINFO = r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#\s@]*@"
_SIGNED_QUERY = rf"[?&][^=&#\s]*(?:{_KEY_WORDS})[^=&#\s]*=|[?&](?:{_QUERY_NAMES})="
# Case-sensitive by nature: these are the documented shapes of the tokens themselves.
_TOKEN_SHAPES = {
    "an AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "a Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}",
    "a GitHub token": r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})",
    "a private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "a JWT (bearer token)": r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+",
}
_USERINFO_RE = re.compile(_USERINFO)
_TOKEN_RES = {what: re.compile(rx) for what, rx in _TOKEN_SHAPES.items()}

# Values a secret-named key may hold that are modes, not secrets (gcsfs ``token``: "anon", "cloud", ...).
_NOT_SECRET_VALUES = {"", "anon", "google_default", "cloud", "cache", "browser", "none", "null"}

USERINFO_REASON = "a user or password before '@' in a URL"


@dataclass(frozen=True)
class Finding:
    """Where a credential is (a dotted path) and what it looks like; never the value."""

    path: str
    reason: str
    kind: str  # "key" (a secret-named key holds a value) or "value" (the value itself is one)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


def is_secret_key(name: Any) -> bool:
    """Whether a key / option / parameter name names a credential (``secret``, ``SSECustomerKey``...)."""
    return bool(SECRET_KEY.search(str(name)))


def _query_names(text: str) -> Iterator[str]:
    _, sep, query = text.partition("?")
    if sep:
        for part in re.split(r"[&;]", query.split("#", 1)[0]):
            name, eq, _ = part.partition("=")
            if eq and name:
                yield name.strip()


def value_problem(text: Any) -> str | None:
    """What credential the string ``text`` holds (userinfo in a URL, a signed/token query parameter, a
    token-shaped value), or None. The answer never contains the value."""
    if not isinstance(text, str) or not text:
        return None
    if _USERINFO_RE.search(text):
        return USERINFO_REASON
    for name in _query_names(text):
        if is_secret_key(name) or re.fullmatch(_QUERY_NAMES, name):
            return f"a signed-URL or token query parameter ({name[:40]})"
    for what, rx in _TOKEN_RES.items():
        if rx.search(text):
            return f"a value shaped like {what}"
    return None


def _holds_value(v: Any) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, str):
        return v.strip().lower() not in _NOT_SECRET_VALUES
    if isinstance(v, (list, tuple, set)):
        return any(_holds_value(x) for x in v)
    return True


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def find_secrets(obj: Any, prefix: str = "") -> list[Finding]:
    """Every credential in a nested structure of dicts, lists and strings (a run config, storage
    options, manifest metadata), by dotted path (``publish.storage_options.key``, ``overrides[0]``).

    A secret-named key counts when it holds a value (a mapping under it is searched instead, so
    ``auth: {type: basic}`` is fine and ``auth: {token: ...}`` is reported at ``auth.token``).
    """
    found: list[Finding] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            path = _join(prefix, k)
            if is_secret_key(k) and not isinstance(v, Mapping) and _holds_value(v):
                found.append(Finding(path, "a secret-looking key", "key"))
            else:
                if (why := value_problem(k)) is not None:  # a URL used as a key
                    found.append(Finding(path, why, "value"))
                found += find_secrets(v, path)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            found += find_secrets(v, f"{prefix}[{i}]")
    elif isinstance(obj, bytes):
        found += find_secrets(obj.decode("utf-8", "replace"), prefix)
    elif (why := value_problem(obj)) is not None:
        found.append(Finding(prefix, why, "value"))
    return found


def describe(found: list[Finding]) -> list[str]:
    """One line per field for a refusal: secret-named keys grouped under the option set that holds
    them (``data.storage_options: has secret-looking key(s) key, client_kwargs.token``), credential
    values by path (``publish.store: holds credentials (a user or password before '@' in a URL)``)."""
    groups: dict[str, list[str]] = {}
    lines: list[str] = []
    for f in found:
        if f.kind != "key":
            lines.append(
                f"{f.path}: holds credentials ({f.reason})" if f.path else f"holds credentials ({f.reason})"
            )
            continue
        parts = f.path.split(".")
        cut = max(
            (i + 1 for i, p in enumerate(parts[:-1]) if p.endswith("storage_options")), default=len(parts) - 1
        )
        field, rel = ".".join(parts[:cut]) or "<root>", ".".join(parts[cut:])
        if field not in groups:
            groups[field] = []
            lines.append(field)  # placeholder, filled below in first-seen order
        groups[field].append(rel)
    return [
        f"{line}: has secret-looking key(s) {', '.join(groups[line])}" if line in groups else line
        for line in lines
    ]


def text_findings(text: str) -> list[Finding]:
    """Credentials in free text (a YAML or JSON file as written, comments included): ``line N`` for
    each line where a secret-named ``name: value`` / ``name=value`` pair or a credential value appears."""
    found = []
    pair = re.compile(r"""([A-Za-z0-9_.\-]+)["']?\s*[:=]\s*["']?([^\s,{}\[\]"']+)""")
    for n, line in enumerate(text.splitlines(), 1):
        names = [
            m.group(1) for m in pair.finditer(line) if is_secret_key(m.group(1)) and _holds_value(m.group(2))
        ]
        if names:
            found.append(Finding(f"line {n}", f"a secret-looking key ({names[0][:40]})", "key"))
        elif (why := value_problem(line)) is not None:
            found.append(Finding(f"line {n}", why, "value"))
    return found


def secret_key_paths(options: Any, prefix: str = "") -> Iterator[str]:
    """The dotted path of every credential in nested dicts/lists (``client_kwargs.token``), keys and
    values alike (see ``find_secrets``)."""
    for f in find_secrets(options, prefix):
        yield f.path


def safe_uri(uri: str) -> str:
    """``uri`` fit for a log or an error: any ``user:password@`` dropped, secret query values masked."""
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    if parts.username is not None or parts.password is not None:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=host)
    if parts.query and value_problem(f"?{parts.query}"):
        q = [
            f"{k}=***" if is_secret_key(k) or re.fullmatch(_QUERY_NAMES, k) else f"{k}={v}"
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query="&".join(q))
    return urlunsplit(parts)


def _secret_strings(obj: Any) -> Iterator[str]:
    """The credential substrings in ``obj`` (URIs, nested options): userinfo parts, secret query
    values, values under secret-named keys, token-shaped values."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if is_secret_key(k) and isinstance(v, (str, bytes, int)) and _holds_value(v):
                yield str(v)
            else:
                yield from _secret_strings(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _secret_strings(v)
    elif isinstance(obj, str) and value_problem(obj):
        if m := re.search(r"://([^/?#\s@]*)@", obj):
            yield from (p for p in re.split(r"[:]", m.group(1)) if p)
            yield m.group(1)
        for k, v in parse_qsl(urlsplit(obj).query if "://" in obj else "", keep_blank_values=True):
            if v and (is_secret_key(k) or re.fullmatch(_QUERY_NAMES, k)):
                yield v
        for rx in _TOKEN_RES.values():
            yield from (m.group(0) for m in rx.finditer(obj))


def scrub(text: str, *sources: Any) -> str:
    """``text`` (an exception message, say) with every credential found in ``sources`` (the URI and
    options it was made from) replaced by ``***``: third-party errors quote what they were given."""
    for secret in sorted(set().union(*(set(_secret_strings(s)) for s in sources)), key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def redact(options: Any) -> Any:
    """A copy of storage options (nested dicts and lists) fit for a log: values under secret-named keys
    become ``'***'``, URLs lose their userinfo and signed query values, token-shaped strings are masked."""
    if isinstance(options, Mapping):
        return {k: ("***" if is_secret_key(k) and v is not None else redact(v)) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return type(options)(redact(v) for v in options)
    if isinstance(options, str) and value_problem(options):
        cleaned = safe_uri(options)
        return cleaned if cleaned != options and not value_problem(cleaned) else "***"
    return options


# ----------------------------------------------------------------------------- flow parameter types
# Prefect stores a flow run's parameters in its database before the flow runs (and shows them in the
# UI): these types refuse credentials in the parameters themselves. Their JSON schema carries the same
# rule as a pattern, so the deployment's parameter_openapi_schema makes Prefect's server refuse such a
# flow run when it is created (enforce_parameter_schema, on by default), before anything is stored.

_QUOTE = "[\x22']"  # " or ' (a backslash-quote is not a valid escape in an ECMAScript unicode regex)
_OVERRIDE_FORM = r"^\s*[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*\s*="
# The same rule as find_secrets on a parsed KEY=VALUE, in text form: a secret word in the key, a bare
# secret segment (``...storage_options.key=``), a secret key inside a YAML/JSON mapping value, userinfo,
# a signed query, a token shape.
OVERRIDE_SECRET_PATTERN = "|".join(
    [
        rf"^[^=]*(?:{_KEY_WORDS})",
        rf"^(?:[^=]*\.)?\s*(?:{_BARE_KEYS})\s*=",
        rf"=.*(?:{_KEY_WORDS})[A-Za-z0-9_-]*{_QUOTE}?\s*:",
        rf"=.*[{{,\s\x22'](?:{_BARE_KEYS}){_QUOTE}?\s*:",
        _USERINFO,
        _SIGNED_QUERY,
        *_TOKEN_SHAPES.values(),
    ]
)
LOCATION_SECRET_PATTERN = "|".join([_USERINFO, _SIGNED_QUERY, *_TOKEN_SHAPES.values()])
_OVERRIDE_SECRET_RE = re.compile(OVERRIDE_SECRET_PATTERN)


def override_problem(item: str) -> str | None:
    """What is wrong with one ``dotted.key=value`` flow/CLI override: not that form, or a credential
    (in the key, in the value parsed as YAML, or in its text). None when it is fine."""
    import yaml

    if not isinstance(item, str) or not re.match(_OVERRIDE_FORM, item):
        return "is not of the form dotted.key=value (e.g. train.lr=1e-4)"
    key, _, raw = item.partition("=")
    path = key.strip()
    if bad := [p for p in path.split(".") if is_secret_key(p)]:
        return f"sets {path}, a secret-looking key ({bad[0]})"
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if found := find_secrets(value, path):
        return f"holds a credential: {found[0]}"
    if (why := value_problem(raw)) is not None or _OVERRIDE_SECRET_RE.search(item):
        return f"holds a credential: {path}: {why or 'matches the credential pattern'}"
    return None


def _check_override(item: str) -> str:
    if (why := override_problem(item)) is not None:
        # A custom error type: Prefect's message lists only 'loc: msg', never the rejected input.
        raise PydanticCustomError(
            "credential_in_parameter",
            f"this override {why}; flow parameters are stored and shown by Prefect, so {WHERE_INSTEAD}",
        )
    return item


def _check_location(uri: str) -> str:
    if (why := value_problem(uri)) is not None:
        raise PydanticCustomError(
            "credential_in_parameter",
            f"this path or URI holds credentials ({why}); flow parameters are stored and shown by Prefect, "
            f"so {WHERE_INSTEAD}",
        )
    return uri


# ``dotted.key=value`` with no credential in it (a flow parameter; a plain str for Python callers).
Override = Annotated[
    str,
    AfterValidator(_check_override),
    Field(
        pattern=_OVERRIDE_FORM,
        # The form again in the JSON schema: after an AfterValidator pydantic leaves ``pattern`` out of it,
        # and the schema is what Prefect's server checks a deployment's flow run against.
        json_schema_extra={"pattern": _OVERRIDE_FORM, "not": {"pattern": OVERRIDE_SECRET_PATTERN}},
        description="dotted.key=value (e.g. train.lr=1e-4); never a credential (docs/secrets.md)",
    ),
]
# A run-config path or URI with no credential in it (a flow parameter).
ConfigRef = Annotated[
    str,
    AfterValidator(_check_location),
    Field(
        json_schema_extra={"not": {"pattern": LOCATION_SECRET_PATTERN}},
        description="a run config YAML path or fsspec URI; never with credentials in it (docs/secrets.md)",
    ),
]
