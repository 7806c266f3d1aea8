"""RunConfig: strict keys, field and cross-field checks, dotted overrides, resolved-config round trip."""

from __future__ import annotations

import pytest

from core.config import (
    ATTENTION_MLP,
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
)
from core.run import RunDir
from tests.conftest import REPO


def _write(tmp_path, text: str, name: str = "run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# --- loading --------------------------------------------------------------------------------------


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.method == "lora"
    assert cfg.lora.r == 8
    assert cfg.lora.target_modules == ATTENTION_MLP
    assert cfg.train.lr == 2e-4
    assert cfg.zero_stage == 0  # derived: lora defaults to no ZeRO
    assert cfg.micro_batch_size == 8


def test_yaml_file_load(tmp_path):
    p = _write(
        tmp_path,
        "name: exp1\nmethod: qlora\nlora:\n  r: 16\n  target_modules: [q_proj, v_proj]\n"
        "train:\n  lr: 3.0e-5\n  batch_size: 16\n  grad_accum: 4\n",
    )
    cfg = load_config(p)
    assert cfg.name == "exp1"
    assert cfg.method == "qlora"
    assert cfg.lora.r == 16
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.micro_batch_size == 4
    # untouched sections keep their defaults
    assert cfg.eval.batch_size == 16


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == load_config()


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        ("nmae: x\n", "nmae"),
        ("lora:\n  rnak: 4\n", "lora.rnak"),
        ("train:\n  learning_rate: 1.0e-4\n", "train.learning_rate"),
    ],
)
def test_unknown_key_names_its_path(tmp_path, text, key_path):
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, text))
    msg = str(exc.value)
    assert f"{key_path}: unknown key" in msg
    assert str(tmp_path / "run.yaml") in msg  # the source file is named


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("lora.r=0", "lora.r"),
        ("lora.r=-2", "lora.r"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-4", "train.lr"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.alpha=-16", "lora.alpha"),
        ("method=prefix", "method"),
    ],
)
def test_invalid_field_names_the_field(override, field):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[override])
    msg = str(exc.value)
    assert f"  - {field}:" in msg
    assert "1 problem(s)" in msg


def test_unknown_method_message_shows_value_and_choices():
    with pytest.raises(ConfigError, match=r"method: .*'full'.*'lora'.*'qlora'.*\(got 'prefix'\)"):
        config_from_dict({"method": "prefix"})


def test_all_problems_reported_at_once(tmp_path):
    p = _write(tmp_path, "method: dpo\nlora:\n  r: 0\n  rnak: 4\ntrain:\n  lr: -1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "4 problem(s)" in msg
    for field in ("method", "lora.r", "lora.rnak", "train.lr"):
        assert f"  - {field}:" in msg, (field, msg)


# --- overrides ------------------------------------------------------------------------------------


def test_override_applies():
    cfg = load_config(overrides=["train.lr=1e-4", "lora.dropout=0.05", "name=sweep-3"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert isinstance(cfg.train.lr, float)
    assert cfg.lora.dropout == pytest.approx(0.05)
    assert cfg.name == "sweep-3"


def test_override_on_top_of_yaml_file(tmp_path):
    p = _write(tmp_path, "lora:\n  r: 16\n  dropout: 0.1\n")
    cfg = load_config(p, overrides=["lora.r=4"])
    assert cfg.lora.r == 4
    assert cfg.lora.dropout == pytest.approx(0.1)  # sibling keys from the file survive


def test_override_is_revalidated(tmp_path):
    p = _write(tmp_path, "lora:\n  r: 16\n")
    with pytest.raises(ConfigError, match=r"lora\.r: .*greater than 0"):
        load_config(p, overrides=["lora.r=0"])


def test_override_unknown_key_fails():
    with pytest.raises(ConfigError, match=r"lora\.rnak: unknown key"):
        load_config(overrides=["lora.rnak=4"])


def test_override_list_value_is_yaml():
    cfg = load_config(overrides=["lora.target_modules=[q_proj,v_proj]"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    cfg = load_config(overrides=["lora.target_modules=all-linear", "train.gradient_checkpointing=true"])
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.train.gradient_checkpointing is True


def test_apply_overrides_does_not_mutate_input():
    data = {"lora": {"r": 16}}
    out = apply_overrides(data, ["lora.r=4", "train.lr=0.001"])
    assert data == {"lora": {"r": 16}}
    assert out == {"lora": {"r": 4}, "train": {"lr": 0.001}}


@pytest.mark.parametrize("bad", ["train.lr", "=1e-4", "train..lr=1", ".lr=1", "train.=1", "  =x"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match=r"bad override .*expected dotted\.key=value"):
        parse_override(bad)
    with pytest.raises(ConfigError, match="bad override"):
        load_config(overrides=[bad])


def test_override_through_a_value_fails():
    with pytest.raises(ConfigError, match=r"'name' is a value, not a section"):
        load_config(overrides=["name=a", "name.x=1"])
    # a key absent from the data becomes a section, which validation then rejects by name
    with pytest.raises(ConfigError, match=r"  - name: Input should be a valid string"):
        load_config(overrides=["name.x=1"])


# --- cross-field checks ---------------------------------------------------------------------------


def test_qlora_with_zero3_fails_and_says_what_to_do():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["method=qlora", "train.zero_stage=3"])
    msg = str(exc.value)
    assert "train.zero_stage=3" in msg
    assert "qlora" in msg
    assert "use zero_stage 0-2" in msg
    # the same zero stage is fine for lora, and qlora is fine with stage 2
    assert load_config(overrides=["method=lora", "train.zero_stage=3"]).zero_stage == 3
    assert load_config(overrides=["method=qlora", "train.zero_stage=2"]).zero_stage == 2


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["lora.use_dora=true", "lora.init_lora_weights=pissa"], "use one of them, not both"),
        (["lora.use_dora=true", "lora.init_lora_weights=olora"], "use one of them, not both"),
        (["method=lora", "lora.use_dora=true", "train.zero_stage=3"], "use zero_stage 0-2"),
        (["method=qlora", "lora.init_lora_weights=pissa"], "use method 'lora', or lora.init_lora_weights"),
    ],
)
def test_adapter_variant_combinations_that_cannot_work_are_refused(overrides, says):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=overrides)
    assert says in str(exc.value)


def test_adapter_variants_that_work_together_load():
    assert load_config(overrides=["lora.use_dora=true", "train.zero_stage=2"]).lora.use_dora
    assert load_config(overrides=["method=qlora", "lora.use_dora=true"]).lora.use_dora
    pissa = load_config(overrides=["lora.init_lora_weights=pissa_niter_4", "train.zero_stage=3"])
    assert pissa.lora.init_lora_weights == "pissa_niter_4"
    # zero_stage 3 is the full method's business; use_dora is not read there
    assert load_config(overrides=["method=full", "lora.use_dora=true", "train.zero_stage=3"])


def test_batch_size_must_divide_by_accum_times_processes():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["train.batch_size=12", "train.grad_accum=4", "train.num_processes=2"])
    msg = str(exc.value)
    assert "train.batch_size=12" in msg
    assert "= 8" in msg
    assert "use a multiple of 8" in msg
    cfg = load_config(overrides=["train.batch_size=16", "train.grad_accum=4", "train.num_processes=2"])
    assert cfg.micro_batch_size == 2
    assert cfg.world_size == 2


def test_cross_field_problems_reported_together():
    with pytest.raises(ConfigError) as exc:
        load_config(
            overrides=["method=qlora", "train.zero_stage=3", "train.batch_size=7", "train.grad_accum=2"]
        )
    msg = str(exc.value)
    assert "zero_stage=3" in msg
    assert "train.batch_size=7" in msg


@pytest.mark.parametrize(
    ("method", "include", "wrong", "valid"),
    [
        ("lora", "[model]", "'model'", "['adapter', 'merged']"),
        ("qlora", "[adapter, model]", "'model'", "['adapter', 'merged']"),
        ("full", "[merged]", "'merged'", "['model']"),
        ("full", "[adapter, model]", "'adapter'", "['model']"),
    ],
)
def test_publish_include_must_name_what_the_method_produces(method, include, wrong, valid):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[f"method={method}", f"publish.include={include}"])
    msg = str(exc.value)
    assert f"publish.include has {wrong} but method '{method}'" in msg
    assert f"valid values are {valid}" in msg


@pytest.mark.parametrize(
    ("method", "include"),
    [("lora", "[adapter]"), ("lora", "[adapter, merged]"), ("qlora", "[merged]"), ("full", "[model]")],
)
def test_publish_include_accepts_what_the_method_produces(method, include):
    cfg = load_config(overrides=[f"method={method}", f"publish.include={include}"])
    assert cfg.publish.include == include.strip("[]").split(", ")


def test_publish_include_is_not_checked_when_publish_is_disabled():
    assert load_config(overrides=["method=lora", "publish.include=[model]", "publish.enabled=false"])


# --- storage options: no credentials in a run config ----------------------------------------------


def test_storage_options_reject_credentials_and_say_where_they_go():
    with pytest.raises(ConfigError) as exc:
        load_config(
            overrides=[
                "publish.storage_options={key: AKIAXXXX, secret: s3cr3t-value}",
                "data.storage_options={client_kwargs: {endpoint_url: 'http://s3:9000', "
                "aws_secret_access_key: s3cr3t-nested}}",
            ]
        )
    msg = str(exc.value)
    assert "publish.storage_options: has secret-looking key(s) key, secret" in msg
    assert "data.storage_options: has secret-looking key(s) client_kwargs.aws_secret_access_key" in msg
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_PROFILE" in msg and "instance role" in msg
    for value in ("AKIAXXXX", "s3cr3t-value", "s3cr3t-nested"):
        assert value not in msg  # the rejection itself must not print the secret


def test_credentials_inside_uris_are_refused_without_echoing_them():
    with pytest.raises(ConfigError) as exc:
        load_config(
            overrides=[
                "publish.store=s3://AKIAXXXX:s3cr3t-store@bucket/models",
                "model.name_or_path=https://deploy:s3cr3t-hub@models.example/llama",
                "data.eval_path=sftp://me@host/eval.jsonl",  # a user name alone is refused too
            ]
        )
    msg = str(exc.value)
    for field in ("publish.store", "model.name_or_path", "data.eval_path"):
        assert f"{field}: holds credentials (a user or password before '@' in a URL)" in msg
    assert "AWS_PROFILE" in msg and "s3cr3t" not in msg and "AKIAXXXX" not in msg
    ok = load_config(overrides=["publish.store=s3://bucket/models", "model.name_or_path=/models/llama"])
    assert ok.publish.store == "s3://bucket/models"


def test_publish_version_is_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"publish.version: '../v1' is not a safe name"):
        load_config(overrides=["publish.version=../v1"])
    assert load_config(overrides=["publish.version=v7-rc1"]).publish.version == "v7-rc1"


@pytest.mark.parametrize(
    "options",
    [
        {"token": "t"},
        {"password": "p"},
        {"client_kwargs": {"aws_session_token": "t"}},
        {"config_kwargs": {"nested": [{"api_key": "k"}]}},
    ],
)
def test_storage_options_reject_nested_and_listed_credentials(options):
    from core.config import DataConfig, ModelConfig, PublishConfig

    for cls in (DataConfig, ModelConfig, PublishConfig):
        with pytest.raises(ValueError, match="secret-looking") as exc:
            cls(storage_options=options)
        assert "input_value" not in str(exc.value)  # pydantic would otherwise echo the dict


def test_storage_options_allow_non_secret_options():
    opts = "{anon: false, client_kwargs: {endpoint_url: 'http://s3:9000'}, config_kwargs: {s3: {addressing_style: path}}}"
    cfg = load_config(overrides=[f"publish.storage_options={opts}", f"data.storage_options={opts}"])
    assert cfg.publish.storage_options["client_kwargs"] == {"endpoint_url": "http://s3:9000"}
    assert cfg.data.storage_options["anon"] is False


# --- derived values -------------------------------------------------------------------------------


def test_alpha_defaults_to_twice_r():
    assert load_config().lora.lora_alpha == 16.0
    assert load_config(overrides=["lora.r=4"]).lora.lora_alpha == 8.0
    assert load_config(overrides=["lora.r=4", "lora.alpha=32"]).lora.lora_alpha == 32.0
    assert load_config().lora.alpha is None  # stays unset in the resolved file; derived on read


# --- resolved config ------------------------------------------------------------------------------


def test_write_read_resolved_round_trip(tmp_path):
    cfg = load_config(
        overrides=[
            "name=rt",
            "method=qlora",
            "lora.r=4",
            "lora.target_modules=[q_proj,v_proj]",
            "lora.rank_pattern={q_proj: 2}",
            "train.lr=1e-4",
            "train.adam_betas=[0.8,0.95]",
            "train.zero_stage=2",
            "publish.storage_options={anon: false}",
        ]
    )
    rd = RunDir(tmp_path / "runs" / "rt")
    path = rd.write_config(cfg)
    assert path == tmp_path / "runs" / "rt" / "run_config.yaml"
    assert sorted(p.name for p in path.parent.iterdir()) == ["run_config.yaml"]  # no temp file left
    back = rd.config()
    assert back == cfg
    assert back.train.adam_betas == (0.8, 0.95)
    assert back.lora.rank_pattern == {"q_proj": 2}
    assert back != load_config()  # the comparison is not vacuous


# --- file errors ----------------------------------------------------------------------------------


def test_missing_file_message(tmp_path):
    with pytest.raises(ConfigError, match=r"run config .*nope\.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_message(tmp_path):
    p = _write(tmp_path, "lora:\n  r: [8\n")
    with pytest.raises(ConfigError, match=r"run config .*run\.yaml is not valid YAML"):
        load_config(p)


def test_non_mapping_yaml_message(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping at the top, got list"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_read_resolved_missing(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunDir(tmp_path).config()


def test_yaml_1_1_words_stay_strings(tmp_path):
    # PyYAML's YAML 1.1 rules read off/no/yes/on as booleans: a run called "off" would be rejected.
    cfg = load_config(overrides=["name=off", "publish.model_name=no", "train.gradient_checkpointing=true"])
    assert (cfg.name, cfg.publish.model_name, cfg.train.gradient_checkpointing) == ("off", "no", True)
    path = tmp_path / "run.yaml"
    path.write_text("name: yes\nmerge:\n  enabled: false\n")
    cfg = load_config(path)
    assert cfg.name == "yes" and cfg.merge.enabled is False


@pytest.mark.parametrize("path", sorted((REPO / "deploy" / "runs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_configs_validate(path):
    cfg = load_config(path)
    assert "deltatune run deploy/runs/" + path.name in path.read_text()  # each starts with its command
    if cfg.train.deepspeed_config:
        assert (REPO / cfg.train.deepspeed_config).is_file()
