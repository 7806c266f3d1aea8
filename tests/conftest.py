"""Shared fixtures: an isolated environment, Prefect's test harness, S3 on loopback, tiny models.

Nothing here reaches the network. Slow fixtures (model builds, the Prefect server) are session-scoped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before prefect is imported anywhere: no stray API URL (a live server), no telemetry, quiet logs.
for _key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILES_PATH"):
    os.environ.pop(_key, None)
os.environ.update(
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    DO_NOT_TRACK="1",
    PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS="false",
    PREFECT_LOGGING_LEVEL="WARNING",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    TOKENIZERS_PARALLELISM="false",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
)

from tests.s3_fixtures import moto_s3, moto_server  # noqa: E402,F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(seed: int = 0, **overrides):
    """A random tiny Llama, fp32, in eval mode; ``overrides`` go to LlamaConfig.

    Every size is a multiple of 32, which bitsandbytes' CPU 4-bit kernels need (docs/environment.md).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.families import SMALL

    torch.manual_seed(seed)
    # head_dim follows hidden_size / heads here, so that overrides of either stay consistent
    kw = {**SMALL, "head_dim": None, "tie_word_embeddings": False, **overrides}
    return LlamaForCausalLM(LlamaConfig(**kw)).float().eval()


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Prefect's database in a temp dir; tests share one data/model cache (DELTATUNE_CACHE if set)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ.setdefault("DELTATUNE_CACHE", str(Path.home() / ".cache" / "deltatune"))


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API (SQLite) for the whole session, flow heartbeats off."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quickly built tiny Llama (few pretrain steps): for wiring tests that need not learn the task."""
    from core.tiny import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "small",
        pretrain_steps=20,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=512,
        seq_len=64,
    )


@pytest.fixture
def run_config(small_model_dir: Path, tmp_path: Path):
    """A factory for a RunConfig on the small model, writing into tmp_path (dotted overrides)."""
    from core.config import load_config

    def make(*overrides: str):
        base = [
            f"model.name_or_path={small_model_dir}",
            f"output_dir={tmp_path / 'runs'}",
            f"data.path={REPO / 'examples/demo/train.jsonl'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_seq_len=64",
            f"publish.store={tmp_path / 'artifacts'}",
            f"cache.storage={tmp_path / 'results'}",  # each test reuses only its own stage results
            "train.batch_size=8",
            "train.lr=1e-3",
            "train.max_steps=6",
            "train.save_every=0",
            "eval.generation_rows=4",
            "eval.max_new_tokens=4",
        ]
        return load_config(overrides=[*base, *overrides])

    return make
