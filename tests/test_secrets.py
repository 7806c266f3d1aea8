"""No credential anywhere: run configs, flow parameters (through a real deployment on Prefect's API),
published versions, logs. One rule (core/secretkeys.py); every refusal names where, never the value."""

from __future__ import annotations

import json
import logging

import pytest

from core import secretkeys
from core.config import ConfigError, load_config
from core.secretkeys import find_secrets, override_problem, redact, safe_uri

MARK = "S3CR3T"  # every credential below contains it: no message, log or stored record may

# KEY=VALUE overrides that carry a credential: each must be refused by the Python rule (config load,
# flow parameter validation) and by the JSON-schema text form that Prefect's server checks.
BAD = [
    f"publish.storage_options.key=AKIA{MARK}00000000000",
    f"publish.storage_options={{key: {MARK}-a, secret: {MARK}-b}}",
    f"publish.store=s3://AKIAEXAMPLE:{MARK}@bucket/models",
    f"data.path=https://h.example/f.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=c&X-Amz-Signature={MARK}",
    f"data.path=https://h.example/f.jsonl?X-Amz-Security-Token={MARK}",
    f"data.path=https://acct.blob.core.windows.net/c/train.jsonl?sv=2022-11-02&se=2030-01-01&sp=r&sig={MARK}",
    f"model.name_or_path=https://storage.googleapis.com/b/o?GoogleAccessId=sa&Expires=1&Signature={MARK}",
    f"data.storage_options.s3_additional_kwargs.SSECustomerKey={MARK}",
    f'publish.storage_options={{"s3_additional_kwargs": {{"SSECustomerAlgorithm": "AES256", "SSECustomerKey": "{MARK}"}}}}',
    f"output_dir=s3://user:{MARK}@bucket/runs",
    f"data.cache_dir=https://cache.example/x?token={MARK}",
    f"cache.storage=s3://k:{MARK}@bucket/results",
    f"publish.storage_options.client_kwargs.endpoint_url=https://u:{MARK}@minio.example:9000",
    f"publish.storage_options.client_kwargs.aws_session_token={MARK}",
    f"model.revision=hf_{MARK}abcdefghijklmnopqrstuvwxyzAB",
    f"train.master_addr=https://x.example/?access_token={MARK}",
    f"publish.storage_options={{headers: {{Authorization: Bearer {MARK}}}}}",
]
# Overrides that look a little like the above and are fine.
OK = [
    "train.lr=1e-4",
    "eval.max_new_tokens=5",
    "model.tokenizer=/models/tok",
    "name=llama3-8b-support-lora-nightly",
    "data.path=s3://bucket/data/train.jsonl",
    "publish.storage_options={client_kwargs: {endpoint_url: 'http://s3:9000'}, anon: false}",
    "lora.target_modules=[q_proj, v_proj]",
    "data.path=hf://datasets/org/x@main/train.jsonl",
    "model.name_or_path=meta-llama/Meta-Llama-3-8B",
    "publish.storage_options.s3_additional_kwargs.ServerSideEncryption=aws:kms",
    "publish.storage_options.s3_additional_kwargs.SSEKMSKeyId=arn:aws:kms:us-east-1:1:key/abc",
    "data.path=https://example.com/data.jsonl?version=3",
]


def _schema_refuses(item: str) -> bool:
    """What Prefect's server decides for one override under the flow's parameter schema."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from flows.finetune import finetune

    try:
        validate({"overrides": [item]}, parameter_schema(finetune).model_dump(), raise_on_error=True)
    except ValidationError:
        return True
    return False


@pytest.mark.parametrize("item", BAD)
def test_every_credential_is_refused_by_config_flow_schema_and_rule_without_echo(item):
    why = override_problem(item)
    assert why and MARK not in why
    assert _schema_refuses(item)
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[item])
    msg = str(exc.value)
    assert MARK not in msg and item.split("=", 1)[0].split(".")[0] in msg
    assert "AWS_PROFILE" in msg and "instance role" in msg


@pytest.mark.parametrize("item", OK)
def test_ordinary_overrides_pass_every_check(item):
    assert override_problem(item) is None
    assert not _schema_refuses(item)
    load_config(overrides=[item])


def test_a_real_config_file_with_sse_c_and_userinfo_is_refused_by_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"""name: r
output_dir: s3://runner:{MARK}1@shared/runs
model:
  name_or_path: s3://models/llama
  storage_options:
    client_kwargs: {{endpoint_url: "https://ak:{MARK}2@minio.internal:9000"}}
data:
  path: s3://bucket/train.jsonl
  cache_dir: s3://svc:{MARK}3@bucket/cache
  storage_options:
    s3_additional_kwargs:
      SSECustomerAlgorithm: AES256
      SSECustomerKey: {MARK}4
publish:
  store: "https://store.example/v?X-Amz-Security-Token={MARK}5"
"""
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert MARK not in msg
    for where in (
        "output_dir: holds credentials (a user or password before '@' in a URL)",
        "model.storage_options.client_kwargs.endpoint_url: holds credentials (a user or password",
        "data.cache_dir: holds credentials (a user or password",
        "data.storage_options: has secret-looking key(s) s3_additional_kwargs.SSECustomerKey",
        "publish.store: holds credentials (a signed-URL or token query parameter (X-Amz-Security-Token))",
    ):
        assert where in msg
    assert "5 credential(s)" in msg  # SSECustomerAlgorithm is not one


def test_non_secret_modes_and_empty_values_are_not_credentials():
    assert find_secrets({"token": "anon", "secret": None, "password": "", "auth": {"type": "basic"}}) == []
    assert [f.path for f in find_secrets({"auth": {"token": "t"}, "l": [{"api_key": "k"}]})] == [
        "auth.token",
        "l[0].api_key",
    ]


def test_logged_uris_and_options_are_masked():
    assert safe_uri(f"https://u:{MARK}@h.example:9/p?X-Amz-Signature={MARK}&a=1") == (
        "https://h.example:9/p?X-Amz-Signature=***&a=1"
    )
    masked = redact(
        {
            "client_kwargs": {"endpoint_url": f"http://k:{MARK}@minio:9000", "region_name": "r"},
            "SSECustomerKey": "x",
        }
    )
    assert masked == {
        "client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "r"},
        "SSECustomerKey": "***",
    }


def test_the_schema_pattern_is_portable_and_case_insensitive():
    # No inline flags, no look-behind: Prefect's server (Python re) and a browser (ECMAScript) read it.
    for pattern in (secretkeys.OVERRIDE_SECRET_PATTERN, secretkeys.LOCATION_SECRET_PATTERN):
        assert "(?i" not in pattern and "(?<" not in pattern
    assert _schema_refuses(f"publish.storage_options.AWS_SECRET_ACCESS_KEY={MARK}")
    assert _schema_refuses(f"data.path=https://h/x?x-amz-signature={MARK}")


def test_the_schema_pattern_means_the_same_to_a_browser(tmp_path):
    """The UI (ECMAScript) reads the same schema: the pattern compiles there, unicode mode included, and
    refuses exactly what Python's re refuses."""
    import re
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("node (an ECMAScript engine) is not installed")
    items = BAD + OK
    script = (
        "const d = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "const out = {};"
        "for (const [name, p] of Object.entries(d.patterns)) {"
        "  const plain = new RegExp(p), uni = new RegExp(p, 'u');"
        "  out[name] = d.items.map(s => [plain.test(s), uni.test(s)]); }"
        "console.log(JSON.stringify(out));"
    )
    patterns = {
        "override": secretkeys.OVERRIDE_SECRET_PATTERN,
        "location": secretkeys.LOCATION_SECRET_PATTERN,
    }
    run = subprocess.run(
        [node, "-e", script],
        input=json.dumps({"patterns": patterns, "items": items}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    verdicts = json.loads(run.stdout)
    for name, pattern in patterns.items():
        python = [bool(re.search(pattern, s)) for s in items]
        assert [a for a, _ in verdicts[name]] == python == [b for _, b in verdicts[name]], name
    assert all(x for x, _ in verdicts["override"][: len(BAD)]) and not any(
        x for x, _ in verdicts["override"][len(BAD) :]
    )


# --- run_config.yaml and the manifest metadata can never be published with a credential ------------


def test_publish_refuses_a_hand_written_run_config_and_uploads_nothing(tmp_path):
    from core.publish import CredentialInVersionError, publish_run
    from core.run import RunDir

    cfg = load_config(overrides=[f"output_dir={tmp_path / 'runs'}", f"publish.store={tmp_path / 'store'}"])
    rd = RunDir.create(cfg)  # validated: clean
    (tmp_path / "eval.json").write_text("{}\n")
    sources = {"run_config.yaml": str(rd.config_path), "eval.json": str(tmp_path / "eval.json")}
    clean = rd.config_path.read_text()
    # Past the config's validation: written by hand after the run started.
    for tampered, where in [
        (
            clean.replace("storage_options: {}", f"storage_options: {{SSECustomerKey: {MARK}}}", 1),
            "SSECustomerKey",
        ),
        (clean + f"# endpoint: https://u:{MARK}@minio:9000\n", "line"),  # a comment, too
        (f"{{not yaml: [token: {MARK}", "line 1"),
    ]:
        rd.config_path.write_text(tampered)
        with pytest.raises(CredentialInVersionError) as exc:
            publish_run(cfg, rd, sources, {"run": cfg.name})
        assert "run_config.yaml" in str(exc.value) and where in str(exc.value)
        assert MARK not in str(exc.value) and "Nothing was uploaded" in str(exc.value)
        assert not exc.value.retryable
        assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))

    rd.config_path.write_text(clean)
    with pytest.raises(CredentialInVersionError, match=r"manifest metadata base_model: a user or password"):
        publish_run(cfg, rd, sources, {"base_model": f"https://u:{MARK}@hub.example/m"})
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))
    assert publish_run(cfg, rd, sources, {"run": cfg.name})["version"] == "v0001"  # clean: published


# --- flow parameters: refused by Prefect's server before it stores the flow run ---------------------


def test_flow_parameter_schema_is_the_same_from_the_object_and_from_the_entrypoint():
    from prefect.utilities.callables import parameter_schema, parameter_schema_from_entrypoint

    from flows.finetune import finetune

    schema = parameter_schema(finetune).model_dump()
    assert schema == parameter_schema_from_entrypoint("flows/finetune.py:finetune").model_dump()
    props = schema["properties"]
    assert props["overrides"]["anyOf"][0]["items"]["not"] == {"pattern": secretkeys.OVERRIDE_SECRET_PATTERN}
    assert props["config"]["anyOf"][0]["not"] == {"pattern": secretkeys.LOCATION_SECRET_PATTERN}


def test_python_callers_pass_plain_strings_and_get_no_echo(caplog):
    from prefect.exceptions import ParameterTypeError

    from flows.finetune import finetune

    ok = finetune.validate_parameters({"config": "deploy/runs/demo.yaml", "overrides": ["train.lr=1e-4"]})
    assert ok["overrides"] == ["train.lr=1e-4"] and type(ok["overrides"][0]) is str
    with pytest.raises(ParameterTypeError) as exc:
        finetune.validate_parameters({"overrides": [f"publish.storage_options.secret={MARK}"]})
    assert "overrides.0" in str(exc.value) and MARK not in str(exc.value)
    with pytest.raises(ParameterTypeError, match="config: this path or URI holds credentials"):
        finetune.validate_parameters({"config": f"s3://u:{MARK}@bucket/run.yaml"})


def test_cli_refuses_a_credential_before_any_flow_run(capsys):
    from flows.cli import main

    assert main(["run", "--set", f"publish.storage_options.client_kwargs.aws_session_token={MARK}"]) == 2
    err = capsys.readouterr().err
    assert "publish.storage_options: has secret-looking key(s) client_kwargs.aws_session_token" in err
    assert MARK not in err


@pytest.mark.slow
def test_deployment_run_with_a_credential_is_refused_and_never_stored(prefect_harness):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    from flows.finetune import finetune

    deployment = finetune.to_deployment(name="no-secrets", parameters={"config": "deploy/runs/demo.yaml"})
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
        assert stored.enforce_parameter_schema
        items = stored.parameter_openapi_schema["properties"]["overrides"]["anyOf"][0]["items"]
        assert items["not"] == {"pattern": secretkeys.OVERRIDE_SECRET_PATTERN}
        for bad in BAD[:6]:
            with pytest.raises(PrefectHTTPStatusError) as exc:
                run_deployment("finetune/no-secrets", parameters={"overrides": [bad]}, timeout=0)
            assert exc.value.response.status_code == 409  # the server's schema check, before storing
        with pytest.raises(PrefectHTTPStatusError):
            run_deployment("finetune/no-secrets", parameters={"config": f"s3://u:{MARK}@b/r.yaml"}, timeout=0)

        good = run_deployment(
            "finetune/no-secrets", parameters={"overrides": ["train.max_steps=2"]}, timeout=0
        )
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
        assert [r.id for r in runs] == [good.id]  # only the clean one exists
        assert runs[0].parameters["overrides"] == ["train.max_steps=2"]
        everything = json.dumps([r.model_dump(mode="json") for r in client.read_flow_runs(limit=200)])
        assert MARK not in everything  # no flow run in the API holds the value
        client.delete_flow_run(good.id)  # no worker here: nothing is left scheduled
        client.delete_deployment(deployment_id)


def test_the_store_refuses_a_uri_credential_and_scrubs_what_its_libraries_quote(caplog):
    from core import store

    caplog.set_level(logging.DEBUG, logger="core.store")
    with pytest.raises(ValueError, match=r"s3://no-such-bucket/x holds credentials") as exc:
        store.check_store(f"s3://AKIAEXAMPLE:{MARK}@no-such-bucket/x")
    assert MARK not in str(exc.value)
    # Credentials passed in storage_options from Python (never from a run config) are the store's own:
    # masked in the log, and scrubbed from the connection error that quotes the endpoint it was given.
    opts = {
        "key": "AKIAEXAMPLE",
        "secret": MARK,
        "client_kwargs": {"endpoint_url": f"http://ak:{MARK}@127.0.0.1:9"},
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
    }
    with pytest.raises(store.StoreUnavailableError) as exc:
        store.check_store("s3://no-such-bucket/x", opts)
    assert "cannot reach artifact store s3://no-such-bucket/x" in str(exc.value)
    assert MARK not in str(exc.value) and MARK not in caplog.text
    assert (
        secretkeys.scrub(f"failed at http://ak:{MARK}@h/ with {MARK}", opts)
        == "failed at http://***@h/ with ***"
    )
