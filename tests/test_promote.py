"""Promotion end to end on a real local folder and real S3 over HTTP (moto): gates, force, integrity,
an unreachable store, racing promotions, the promote flow on Prefect's test harness, and the CLI verbs.

The versions are published by core.store.publish from small files written here (no training): an
eval.json, a merge_report.json and a real tiny adapter built by core.lora / core.adapter.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from core import store
from core.config import load_config
from core.gates import GateError
from core.promotion import promote_version
from flows.cli import main as cli_main
from flows.promote import promote, promote_published  # imports Prefect (and sets up its logging) once, here

MODEL = "tiny"


class Reg(NamedTuple):
    uri: str
    options: dict[str, Any]
    kind: str


@pytest.fixture(params=["local", "s3"])
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> Reg:
    if request.param == "local":
        return Reg(str(tmp_path / "registry"), {}, "local")
    s3 = request.getfixturevalue("moto_s3")
    return Reg(f"s3://{s3.bucket}/registry", s3.storage_options, "s3")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT-format adapter of a tiny Llama, its lora_B moved off zero (as after training)."""
    import torch

    from core.adapter import save_adapter
    from core.config import LoraConfig
    from core.lora import inject_lora, lora_modules
    from tests.conftest import tiny_llama

    model = tiny_llama()
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    inject_lora(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0.0, 0.02)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", cfg, base_model="tiny")


def scores(em: float, loss: float) -> dict[str, Any]:
    return {"loss": loss, "perplexity": 2.718**loss, "exact_match": em, "generated": 4, "seconds": 0.5}


def publish_fake(
    reg: Reg,
    tmp: Path,
    adapter: Path,
    *,
    base_em: float = 0.25,
    tuned_em: float = 0.75,
    gap: float = 2e-5,
    fingerprint: str = "eval-rows-1",
) -> str:
    """Publish a version with the files a finetune run ships; return its version name."""
    src = tmp / f"src-{len(list(tmp.glob('src-*')))}"
    src.mkdir()
    ev = {"method": "lora", "base": scores(base_em, 2.0), "tuned": scores(tuned_em, 1.0)}
    merge = {"max_logit_gap": gap, "mean_logit_gap": gap / 10, "loss_gap": 1e-6}
    (src / "eval.json").write_text(json.dumps(ev))
    (src / "merge_report.json").write_text(json.dumps(merge))
    meta = {
        "method": "lora",
        "eval": {s: {k: ev[s][k] for k in ("loss", "exact_match")} for s in ("base", "tuned")},
        "merge": {"max_logit_gap": gap, "loss_gap": 1e-6},
        "lineage": {"eval_fingerprint": fingerprint},
    }
    sources = {
        "eval.json": src / "eval.json",
        "merge_report.json": src / "merge_report.json",
        "adapter": adapter,
    }
    return store.publish(reg.uri, MODEL, sources, metadata=meta, storage_options=reg.options).version


def statuses(record: dict[str, Any]) -> dict[str, str]:
    return {g["name"]: g["status"] for g in record["gates"]}


def target(reg: Reg) -> str:
    return store.resolve_alias(reg.uri, MODEL, "production", storage_options=reg.options)["version"]


def history(reg: Reg) -> list[dict[str, Any]]:
    return store.alias_history(reg.uri, MODEL, "production", storage_options=reg.options)


def test_a_failing_gate_refuses_and_force_promotes_recorded_as_forced(
    reg: Reg, tmp_path: Path, adapter_dir: Path
) -> None:
    good = publish_fake(reg, tmp_path, adapter_dir)
    bad = publish_fake(reg, tmp_path, adapter_dir, tuned_em=0.25, gap=5e-3)  # no better than base; merge off

    first = promote_version(reg.uri, MODEL, good, "production", storage_options=reg.options)
    assert statuses(first) == {
        "min_improvement": "passed",
        "no_regression": "not_applicable",
        "max_merge_gap": "passed",
        "adapter_integrity": "passed",
        "max_forgetting": "not_applicable",  # no limit set
    }
    assert first["forced"] is False and first["generation"] == 1

    with pytest.raises(GateError) as refused:
        promote_version(reg.uri, MODEL, bad, "production", storage_options=reg.options)
    msg = str(refused.value)
    assert "refused by 3 gate(s)" in msg
    assert "min_improvement (value 0.25, threshold 0.25" in msg and "max_logit_gap: 0.005" in msg
    assert "no_regression (value 0.25, threshold 0.75" in msg
    assert target(reg) == good and len(history(reg)) == 1  # the alias did not move

    forced = promote_version(reg.uri, MODEL, bad, "production", force=True, storage_options=reg.options)
    assert forced["forced"] is True and forced["previous"] == good
    assert (
        statuses(forced)["min_improvement"] == "failed" and statuses(forced)["adapter_integrity"] == "passed"
    )
    assert target(reg) == bad
    assert history(reg)[-1] == forced  # the log keeps the gate results of the forced promotion


def test_a_corrupted_version_is_refused_even_when_forced(reg: Reg, tmp_path: Path, adapter_dir: Path) -> None:
    version = publish_fake(reg, tmp_path, adapter_dir)
    fs, root = store._open_store(reg.uri, reg.options).fs, store._open_store(reg.uri, reg.options).root
    path = f"{root}/{MODEL}/versions/{version}/adapter/adapter_model.safetensors"
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x40  # one byte inside a tensor: the file still loads, its sha256 differs
    fs.pipe_file(path, bytes(data))
    with pytest.raises(store.IntegrityError, match=r"'adapter/adapter_model\.safetensors' does not match"):
        promote_version(reg.uri, MODEL, version, "production", force=True, storage_options=reg.options)
    assert history(reg) == []


def test_no_regression_judges_only_evals_of_the_same_rows(tmp_path: Path, adapter_dir: Path) -> None:
    reg = Reg(str(tmp_path / "registry"), {}, "local")
    best = publish_fake(reg, tmp_path, adapter_dir, tuned_em=0.75)
    worse = publish_fake(reg, tmp_path, adapter_dir, tuned_em=0.5)
    other_rows = publish_fake(reg, tmp_path, adapter_dir, tuned_em=0.5, fingerprint="eval-rows-2")
    promote_version(reg.uri, MODEL, best, "production")
    with pytest.raises(GateError, match=r"1 gate\(s\): no_regression \(value 0.5, threshold 0.75"):
        promote_version(reg.uri, MODEL, worse, "production")
    strict = {"no_regression": {"require_comparable": True}}
    with pytest.raises(GateError, match="cannot compare with v0001: scored on other eval rows"):
        promote_version(reg.uri, MODEL, other_rows, "production", gates=strict)
    record = promote_version(reg.uri, MODEL, other_rows, "production")
    assert statuses(record)["no_regression"] == "not_comparable"
    # A current target that was deleted does not block the promotion that replaces it.
    store._open_store(reg.uri, None).fs.rm(f"{tmp_path}/registry/{MODEL}/versions/{other_rows}/manifest.json")
    record = promote_version(reg.uri, MODEL, best, "production")
    assert statuses(record)["no_regression"] == "not_comparable" and record["previous"] == other_rows


def test_store_down_at_promote_leaves_the_alias(moto_s3: Any, tmp_path: Path, adapter_dir: Path) -> None:  # noqa: F811
    reg = Reg(f"s3://{moto_s3.bucket}/registry", moto_s3.storage_options, "s3")
    one, two = publish_fake(reg, tmp_path, adapter_dir), publish_fake(reg, tmp_path, adapter_dir)
    promote_version(reg.uri, MODEL, one, "production", storage_options=reg.options)
    dead = {
        **reg.options,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    with pytest.raises(store.StoreUnavailableError, match="cannot reach artifact store") as e:
        promote_version(reg.uri, MODEL, two, "production", storage_options=dead)
    assert e.value.retryable
    with pytest.raises(store.StoreUnavailableError):
        store.rollback(reg.uri, MODEL, "production", storage_options=dead)
    assert target(reg) == one and len(history(reg)) == 1


def test_racing_promotions_exactly_one_commits(
    reg: Reg, tmp_path: Path, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two promotions read the same alias generation (a barrier holds both right after the read), then
    both verify, gate and write: each time one commits and the other gets AliasConflictError."""
    versions = [publish_fake(reg, tmp_path, adapter_dir) for _ in range(3)]
    promote_version(reg.uri, MODEL, versions[0], "production", storage_options=reg.options)
    real_state = store._alias_state
    local = threading.local()
    barrier: list[threading.Barrier] = []

    def read_then_wait(s: Any, model: str, alias: str) -> store.AliasState:
        state = real_state(s, model, alias)
        if (
            getattr(local, "racer", False) and not local.waited
        ):  # the decision's read, not the loser's re-read
            local.waited = True
            barrier[-1].wait(timeout=60)
        return state

    monkeypatch.setattr(store, "_alias_state", read_then_wait)
    races, one_winner, conflicts = 20, 0, 0
    for i in range(races):
        barrier.append(threading.Barrier(2))
        outcomes: list[Any] = [None, None]

        def racer(k: int, version: str, outcomes: list[Any]) -> None:
            local.racer, local.waited = True, False
            try:
                outcomes[k] = promote_version(
                    reg.uri, MODEL, version, "production", storage_options=reg.options
                )
            except Exception as exc:  # recorded, judged below
                outcomes[k] = exc

        threads = [
            threading.Thread(target=racer, args=(k, versions[1 + (i + k) % 2], outcomes)) for k in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        wins = [o for o in outcomes if isinstance(o, dict)]
        lost = [o for o in outcomes if isinstance(o, store.AliasConflictError)]
        assert len(wins) == 1 and len(lost) == 1, outcomes
        assert "while this promotion was deciding; re-read it" in str(lost[0])
        assert wins[0]["generation"] == i + 2
        one_winner += 1
        conflicts += len(lost)

    log = history(reg)
    chain_ok = all(b["previous"] == a["version"] for a, b in zip(log, log[1:], strict=False))
    assert [r["generation"] for r in log] == list(range(1, races + 2)) and chain_ok
    print(
        f"\nrace results ({reg.kind}): {one_winner}/{races} races had exactly one winner, {conflicts} "
        f"AliasConflictError, {len(log)} generations with an unbroken from->to chain"
    )


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def flow_log():
    """The flow runs' log lines: Prefect's run loggers do not propagate to pytest's capture (and Prefect
    configures its logging on first import, hence the imports at the top of this file)."""
    logger = logging.getLogger("prefect.flow_runs")
    old, handler = logger.level, _Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_promote_flow_logs_every_gate_and_finetune_can_promote_at_its_end(
    prefect_harness: None, flow_log: list[str], tmp_path: Path, adapter_dir: Path
) -> None:
    reg = Reg(str(tmp_path / "registry"), {}, "local")
    good, bad = (
        publish_fake(reg, tmp_path, adapter_dir),
        publish_fake(reg, tmp_path, adapter_dir, tuned_em=0.1),
    )
    state = promote(MODEL, good, "production", store=reg.uri, return_state=True)
    assert state.is_completed() and state.result()["promoted"] is True
    for name in ("min_improvement: passed", "no_regression: not_applicable", "adapter_integrity: passed"):
        assert any(line.startswith(f"gate {name}") for line in flow_log), flow_log

    cfg = load_config(overrides=[f"publish.store={reg.uri}", "promote.alias=production"])
    refused = promote_published(cfg, {"model": MODEL, "version": bad})
    assert refused["promoted"] is False and "min_improvement" in refused["refused"]
    assert target(reg) == good
    strict = load_config(
        overrides=[f"publish.store={reg.uri}", "promote.alias=production", "promote.fail_on_gate=true"]
    )
    with pytest.raises(GateError):
        promote_published(strict, {"model": MODEL, "version": bad})
    with pytest.raises(ValueError, match="secret-looking"):
        promote(MODEL, good, "production", store=reg.uri, storage_options={"secret": "x"})


def cli(*args: str) -> int:
    return cli_main(list(args))


def test_cli_promote_rollback_versions_pull(
    prefect_harness: None, tmp_path: Path, adapter_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    reg = Reg(str(tmp_path / "registry"), {}, "local")
    good, bad = (
        publish_fake(reg, tmp_path, adapter_dir),
        publish_fake(reg, tmp_path, adapter_dir, tuned_em=0.25),
    )
    at = ("--store", reg.uri)

    assert cli("promote", MODEL, good, "--alias", "production", *at) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["promoted"] is True and out["version"] == good and out["gates"]["min_improvement"] == "passed"

    assert cli("promote", MODEL, bad, "--alias", "production", *at) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        "deltatune: promote failed: GateError: promotion of tiny/v0002 to 'production' refused"
    )
    assert "min_improvement (value 0.25, threshold 0.25" in err
    loose = (
        "--set",
        "promote.gates.min_improvement.enabled=false",
        "--set",
        "promote.gates.no_regression.margin=0.5",
    )
    assert cli("promote", MODEL, bad, "--alias", "production", *loose, *at) == 0
    assert json.loads(capsys.readouterr().out)["gates"]["min_improvement"] == "disabled"

    assert cli("versions", MODEL, *at) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "version",
        "created_at",
        "method",
        "exact_match",
        "loss",
        "max_logit_gap",
        "aliases",
    ]
    assert table[1].split()[0] == good and table[1].split()[-1] == "-"
    assert table[2].split()[0] == bad and table[2].split()[-1] == "production"

    assert cli("rollback", MODEL, "--alias", "production", *at) == 0
    back = json.loads(capsys.readouterr().out)
    assert (back["version"], back["previous"], back["action"]) == (good, bad, "rollback")

    dest = tmp_path / "pulled"
    assert cli("pull", f"{MODEL}@production", str(dest), *at) == 0
    assert json.loads(capsys.readouterr().out)["version"] == good
    assert json.loads((dest / "eval.json").read_text())["tuned"]["exact_match"] == 0.75
    assert (dest / "adapter" / "adapter_model.safetensors").is_file()
    assert cli("versions", MODEL, "--json", *at) == 0
    assert [r["aliases"] for r in json.loads(capsys.readouterr().out)] == [["production"], []]

    # Bad input exits 2, a refused operation 1, each with a `deltatune: ...` message and no traceback.
    for args, code, says in [
        (("pull", f"{MODEL}@production", str(dest), *at), 2, "is not an empty directory"),
        (("pull", "no-at-sign", str(tmp_path / "x"), *at), 2, "expected MODEL@ALIAS or MODEL@VERSION"),
        (("promote", MODEL, good, "--alias", "production", "--set", "train.lr=1", *at), 2, "takes promote.*"),
        (
            ("promote", MODEL, good, "--alias", "production", "--set", "promote.gates.x.y=1", *at),
            2,
            "unknown key",
        ),
        (("versions", MODEL, "--storage-option", "secret=abc", *at), 2, "secret-looking key(s) secret"),
        (("versions", MODEL, "--store", "s3://user:pw@bucket/x"), 2, "holds credentials"),
        (("gc", "--older-than", "soon", *at), 2, "takes a duration"),
        (("rollback", "nobody", "--alias", "production", *at), 1, "AliasNotFoundError"),
    ]:
        assert cli(*args) == code, args
        err = capsys.readouterr().err
        said = err[err.index("deltatune: ") :]  # a config error lists its problems on the lines below
        assert says in said and "Traceback" not in err, (args, err)
        assert "abc" not in err and "pw@" not in err  # a rejected secret is never echoed


def test_cli_gc_and_storage_options(moto_s3: Any, tmp_path: Path, adapter_dir: Path, capsys) -> None:  # noqa: F811
    reg = Reg(f"s3://{moto_s3.bucket}/registry", moto_s3.storage_options, "s3")
    publish_fake(reg, tmp_path, adapter_dir)
    # Credentials come from the environment (the fixture exports them); the endpoint from the options.
    endpoint = ("--storage-option", f"client_kwargs.endpoint_url={moto_s3.endpoint_url}")
    assert cli("versions", MODEL, "--store", reg.uri, *endpoint, "--json") == 0
    assert [r["version"] for r in json.loads(capsys.readouterr().out)] == ["v0001"]
    as_json = ("--storage-option", json.dumps({"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}}))
    assert cli("gc", "--older-than", "1h", "--dry-run", "--store", reg.uri, *as_json) == 0
    assert json.loads(capsys.readouterr().out) == {"multipart_uploads": [], "claims": [], "dry_run": True}
