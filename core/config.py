"""Run configuration: one YAML file per run, validated by pydantic, with dotted overrides.

cfg = load_config("deploy/runs/tiny-lora-cpu.yaml", overrides=["train.lr=1e-4"])
RunDir.create(cfg)                    # core/run.py: run_dir/run_config.yaml, read back by every stage
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.errors import DeltatuneError
from core.metrics import DEFAULT_METRIC, metric_problem
from core.names import is_safe_name
from core.secretkeys import WHERE_INSTEAD, describe, find_secrets, value_problem

# The practice of the LoRA-vs-full-fine-tuning article this project grew from (README): every attention projection plus the MLP, r = 8, alpha = 2r.
# The default lora.target_modules: every attention and MLP projection of the model's family
# (core/targets.py FAMILY_TARGETS), resolved on the model; "all-linear" takes every linear but the head.
ATTENTION_MLP = "attention-mlp"
ATTENTION = "attention"  # the family's attention projections only (core/targets.py)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


def _no_secrets(options: dict[str, Any]) -> dict[str, Any]:
    # run_config.yaml is published with every version, printed by show-config and stored as Prefect
    # flow-run parameters: a credential here would end up in all three. The rule: core/secretkeys.py.
    found = find_secrets(options)
    keys = [f.path for f in found if f.kind == "key"]
    values = [str(f) for f in found if f.kind == "value"]
    if found:
        parts = [f"has secret-looking key(s) {', '.join(keys)}"] if keys else []
        parts += [f"has credentials in {', '.join(values)}"] if values else []
        raise ValueError(
            f"{'; '.join(parts)}: run configs are published and logged, so they must not hold credentials; "
            f"{WHERE_INSTEAD}; keep only non-secret options here (client_kwargs.endpoint_url, "
            "config_kwargs, anon)"
        )
    return options


# fsspec options for a remote URI; never credentials (see _no_secrets).
StorageOptions = Annotated[dict[str, Any], AfterValidator(_no_secrets)]


def _no_credentials(uri: str | None) -> str | None:
    if (why := value_problem(uri)) is not None:
        # A custom type: _format_errors never echoes the rejected value (it holds the secret).
        raise PydanticCustomError(
            "credentials_in_uri",
            f"holds credentials ({why}): run configs are published and logged; remove them from the URI "
            f"and {WHERE_INSTEAD}",
        )
    return uri


# A path or fsspec URI that is written to run_config.yaml: never with credentials in it.
Location = Annotated[str, AfterValidator(_no_credentials)]


def cache_root() -> Path:
    """Root of deltatune's caches (built models, tokenized data): ``$DELTATUNE_CACHE`` or ~/.cache/deltatune."""
    return Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune").expanduser()


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false. PyYAML's 1.1 rules turn ``name=off`` or
    ``model_name: no`` into False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506  (a SafeLoader subclass)


class ConfigError(DeltatuneError, ValueError):
    """A run configuration is invalid; the message lists every problem and how to fix it."""


class _Strict(BaseModel):
    # hide_input_in_errors: a rejected storage_options dict holds the very secret it was rejected for.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), hide_input_in_errors=True
    )


class ModelConfig(_Strict):
    """Which base model to fine-tune and how to load it."""

    name_or_path: Location = "builtin:tiny-llama"
    revision: str | None = None
    tokenizer: Location | None = None  # defaults to name_or_path
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False  # off unless the user opts in: remote code runs with our privileges
    attn_implementation: str | None = None
    storage_options: StorageOptions = Field(default_factory=dict)  # for an s3:// (fsspec) name_or_path


DataFormat = Literal["alpaca", "completion", "text", "chat"]
# data.fields keys: the field names each format reads (the file's names are the values).
FORMAT_FIELD_NAMES = {
    "alpaca": ("instruction", "input", "output", "system"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
    "chat": ("messages", "role", "content"),
}


def _check_fields(fields: dict[str, str], fmt: str, where: str) -> None:
    known = FORMAT_FIELD_NAMES[fmt]
    wrong = sorted(set(fields) - set(known))
    if wrong:
        raise ValueError(
            f"{where}fields maps {', '.join(map(repr, wrong))}, which format {fmt!r} does not read; its fields "
            f"are {', '.join(known)} (write ours as the key and the file's as the value, e.g. "
            "{instruction: question, output: answer})"
        )


class SourceConfig(_Strict):
    """One dataset of a mixture (``data.sources``): its own location, format and field names, and how much
    of the mixture it makes (``weight``, relative) or exactly how many of its rows are used (``rows``)."""

    path: Location
    format: DataFormat | None = None  # default: data.format
    fields: dict[str, str] = Field(default_factory=dict)  # ours -> the file's, e.g. {output: answer}
    weight: PositiveFloat | None = None
    rows: PositiveInt | None = None

    @model_validator(mode="after")
    def _weight_or_rows(self) -> SourceConfig:
        if self.weight is not None and self.rows is not None:
            raise ValueError(f"{self.path}: set weight or rows, not both")
        return self


class DataConfig(_Strict):
    """Where the training data lives and how it becomes token ids."""

    path: Location = "examples/demo/train.jsonl"
    format: DataFormat = "alpaca"
    # Field names of the file when they differ from the format's: ours -> the file's, e.g.
    # {instruction: question, output: answer}; for chat also {messages: conversations, role: from, ...}.
    fields: dict[str, str] = Field(default_factory=dict)
    # Several datasets mixed into one training set (instead of path): each with its own format, fields and
    # a weight or a row count; interleaved deterministically by seed, counted per source in the report.
    sources: list[SourceConfig] = Field(default_factory=list)
    eval_path: Location | None = None  # a separate held-out file; else eval_fraction of `path`
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # More rejected rows than this share of a file fails prepare: it is the wrong file or format far
    # more often than a dataset to train on what is left of. 1.0 accepts any file with a usable row.
    max_reject_fraction: float = Field(0.5, ge=0.0, le=1.0)
    max_seq_len: PositiveInt = 512
    # A row longer than max_seq_len: truncate_turns keeps the longest prefix of whole chat turns that fits
    # (a chat row whose first turn does not fit is rejected too_long; alpaca/completion/text rows are
    # truncated), truncate cuts the sequence, drop rejects the row.
    truncation: Literal["truncate_turns", "truncate", "drop"] = "truncate_turns"
    mask_prompt: bool = True  # loss only on the response tokens (-100 on the prompt)
    add_eos: bool = True  # EOS once, at the end of the sequence (never after each chat turn)
    # chat: a built-in template name (chatml, llama3, ...), a Jinja string or a .jinja file; default the
    # tokenizer's own, else a plain fallback (with a warning that says so).
    chat_template: str | None = None
    system_prompt: str | None = None  # prepended to rows that have none (chat, and alpaca's system field)
    train_on_last_turn_only: bool = False  # chat: train only the last assistant turn
    drop_duplicates: bool = False  # duplicates (exact after whitespace normalisation) are always counted
    # A row with bytes that are not UTF-8: reject it (reason not_utf8, with its line), or decode it with
    # U+FFFD replacement characters and keep it.
    decode_errors: Literal["reject", "replace"] = "reject"
    # Pack rows into sequences of up to max_seq_len (first-fit decreasing); position ids restart per row
    # so that no token attends across rows (docs/packing.md).
    packing: bool = False
    num_proc: PositiveInt | None = None  # tokenisation processes; None: chosen by size (never in the key)
    seed: int = 0
    cache_dir: str | None = None  # content-addressed cache of tokenized splits; default ~/.cache/deltatune
    storage_options: StorageOptions = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sources_and_fields(self) -> DataConfig:
        if self.sources and "path" in self.model_fields_set:
            raise ValueError("set data.path or data.sources, not both (a single source is data.path)")
        _check_fields(self.fields, self.format, "data.")
        for i, src in enumerate(self.sources):
            _check_fields(src.fields, src.format or self.format, f"data.sources[{i}].")
        kinds = {
            ("weight" if s.weight is not None else "rows" if s.rows is not None else None)
            for s in self.sources
        }
        if len(kinds) > 1:
            raise ValueError(
                "data.sources mixes weight, rows and neither: give every source a weight (shares of the mixture), "
                "every source a row count, or none (all rows of each)"
            )
        return self

    @property
    def formats(self) -> set[str]:
        """Every format this data section reads (several with data.sources)."""
        return {s.format or self.format for s in self.sources} or {self.format}


class LoraConfig(_Strict):
    """Low-rank adapter settings (used by method lora and qlora)."""

    r: PositiveInt = 8
    alpha: PositiveFloat | None = None  # None: 2r, the article's default (scale 2.0 at any rank)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = ATTENTION_MLP
    exclude_modules: list[str] | str | None = None
    strict_targets: bool = False  # a listed target name that matches no module: error instead of warning
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)
    rank_pattern: dict[str, PositiveInt] = Field(default_factory=dict)  # module regex/suffix -> r
    alpha_pattern: dict[str, PositiveFloat] = Field(default_factory=dict)
    modules_to_save: list[str] = Field(default_factory=list)  # fully trained, saved with the adapter
    lr_ratio_b: PositiveFloat | None = None  # LoRA+ (Hayou et al. 2024): lr(B) = ratio * lr(A)
    # kaiming (A Kaiming-uniform, B = 0), pissa, pissa_niter_<n> (fast SVD) or olora (core/lora_init.py)
    init_lora_weights: str = Field("kaiming", pattern=r"^(kaiming|pissa|pissa_niter_[1-9][0-9]*|olora)$")
    use_dora: bool = False  # DoRA (Liu et al. 2024, arXiv:2402.09353): a trained magnitude per output row

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError(
                f"is empty: name at least one module (e.g. ['q_proj','v_proj']), or leave it unset for {ATTENTION_MLP!r}"
            )
        if isinstance(v, str) and v not in ("all-linear", ATTENTION_MLP, ATTENTION):
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(
                    f"is not a valid regex ({e}); use a list of names, 'all-linear' or {ATTENTION_MLP!r}"
                ) from e
        return v


class QuantConfig(_Strict):
    """4-bit base quantization for QLoRA (bitsandbytes)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Every 4-bit blocksize bitsandbytes 0.50.2 accepts; all dequantize correctly on CPU too (NF4 error
    # 8.7% at 32 to 11% at 4096 relative, measured on 64x64..96x4096) when the blocksize divides in_features.
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    skip_modules: list[str] = Field(default_factory=list)  # exact or .suffix names kept in full precision


class TrainConfig(_Strict):
    """Optimisation, checkpointing and launch settings of the train stage."""

    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None  # optimizer steps; overrides epochs when set
    batch_size: PositiveInt = 8  # samples per optimizer step, all processes together
    grad_accum: PositiveInt = 1
    lr: PositiveFloat = 2e-4
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: NonNegInt | None = None
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: PositiveFloat | None = 1.0
    seed: int = 42
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on capable GPUs, fp32 on CPU
    save_every: NonNegInt = 50  # optimizer steps between step checkpoints; 0 disables them
    keep_last: PositiveInt = 2
    # Step checkpoints exist to resume an unfinished run; a finished run's outputs supersede them.
    keep_checkpoints: bool = False  # keep them after the run finishes (e.g. to study the trajectory)
    log_every: PositiveInt = 10  # steps between log lines (metrics.jsonl gets every step)
    # Launch (method full always runs under DeepSpeed; lora/qlora may run in-process on one CPU/GPU).
    num_processes: PositiveInt = 1  # per node
    num_nodes: PositiveInt = 1
    node_rank: NonNegInt | None = None  # None: from NODE_RANK / the launcher's environment
    master_addr: str | None = None
    master_port: int | None = Field(None, ge=1, le=65535)
    hostfile: str | None = None
    launcher: Literal["auto", "torchrun", "deepspeed", "inprocess"] = "auto"
    zero_stage: Literal[0, 1, 2, 3] | None = None  # None: 0 for lora/qlora, 2 for full
    deepspeed_config: str | None = None  # a JSON file; overrides zero_stage/offload
    offload_optimizer: bool = False
    offload_params: bool = False
    # The whole launch, every step included; None: no limit. A timeout is not retried (train.retries
    # resumes only failures a retry can fix): give the run more time, or start a new flow run, which
    # resumes from the newest checkpoint (README, "Reruns, retries and resume").
    timeout_s: PositiveInt | None = None
    # Start-up (launch to each rank's first step) fails after this long with no progress in one phase
    # (building DeepSpeed's op, a rendezvous, loading the model, ...), naming the phase; not retried.
    # None: wait forever. Raise it where one phase is slow (a huge model on a slow filesystem).
    startup_timeout_s: PositiveInt | None = 900
    # A Prefect global concurrency limit counting this node's GPUs: the train stage holds num_processes
    # of its slots while it runs, so runs that share a node wait instead of oversubscribing it. None: off
    # (the demo on the ephemeral API); `deltatune setup --gpus N` creates it (README, "Deploying").
    gpu_slots_limit: str | None = None
    retries: NonNegInt = 2  # Prefect retries of the train stage; each retry resumes
    retry_delay_s: NonNegInt = 10


class EvalConfig(_Strict):
    """Held-out loss/perplexity and a generation metric, base vs tuned."""

    enabled: bool = True
    batch_size: PositiveInt = 16
    max_eval_rows: PositiveInt | None = None
    generation_rows: PositiveInt = 64  # rows whose greedy generation is scored
    max_new_tokens: PositiveInt = 32
    # A built-in of core/metrics.py (exact_match, normalized_match, contains, regex, rouge_l) or a
    # function of yours as module:function, called as fn(prediction, reference) -> float in [0, 1].
    metric: str = DEFAULT_METRIC
    regex: str | None = None  # metric regex: searched in the prediction; group 1 (or the match) is the answer
    stop: list[str] = Field(default_factory=list)  # a generation ends at the first of these (cut off)
    sample_rows: NonNegInt = 20  # generated rows kept row by row in eval.json (prompt, prediction, score)
    compare_base: bool = True
    # Forgetting: the loss of base and tuned on general text unrelated to the task (a .txt of
    # blank-line separated paragraphs, or rows with a 'text' field; any data.path-like location),
    # its last `forgetting_tail` share only (a corpus's held-out end), at most `forgetting_rows` texts.
    forgetting_path: Location | None = None
    forgetting_tail: float = Field(1.0, gt=0.0, le=1.0)
    forgetting_rows: PositiveInt = 64

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if (why := metric_problem(v)) is not None:
            raise ValueError(why)
        return v

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(
                    f"is not a valid Python regular expression ({exc}); fix the pattern"
                ) from None
        return v

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("has an empty string, which would cut every generation to nothing; remove it")
        return v

    @model_validator(mode="after")
    def _regex_for_regex_metric(self) -> EvalConfig:
        if self.metric == "regex" and self.regex is None:
            raise ValueError(
                "eval.metric is regex but eval.regex is not set; set eval.regex to a pattern whose group 1 "
                "(or whole match) is the answer, e.g. eval.regex: 'answer: *(\\S+)'"
            )
        return self


class MergeConfig(_Strict):
    """Folding the adapter into the base weights: W + (alpha/r)·B·A."""

    enabled: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # streaming: one base tensor at a time from its safetensors shards, peak memory about the largest
    # tensor plus the adapter (docs/merge.md); in_memory: load the whole base, merge_and_unload, save.
    mode: Literal["streaming", "in_memory"] = "streaming"
    max_shard_size: str = "2GB"  # per output safetensors file, as save_pretrained's max_shard_size
    # QLoRA only (ignored otherwise): merge into the original weights, into dequant(NF4(W)) the adapter
    # trained against, or (auto) build both and keep the one closer to adapter-on-4-bit.
    base: Literal["original", "dequantized", "auto"] = "auto"
    max_logit_gap: PositiveFloat = 1e-3  # max |logits(merged) - logits(adapter-on-base)| allowed
    # |loss(merged) - loss(adapter-on-base)| allowed on the probe rows. An exact fp32 merge measures
    # ~1e-6; 1e-2 nats is far above that and below what a bf16/fp16 merge that damaged the model costs.
    max_loss_gap: PositiveFloat | None = 1e-2
    # The merged model's task metric may fall below the tuned model's by at most this much on the eval
    # rows (the evaluate stage scores both; above it the run fails before publish). An exact merge
    # changes no greedy answer; None: not checked.
    max_metric_drop: float | None = Field(0.05, ge=0.0)

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v: str) -> str:
        cls.size_bytes(v)
        return v

    @staticmethod
    def size_bytes(size: str) -> int:
        """``"2GB"``, ``"500MB"``, ``"1.5GiB"``, ``"4096"`` as bytes: decimal units for KB/MB/GB, binary
        for KiB/MiB/GiB, as transformers' ``convert_file_size_to_int`` reads ``max_shard_size``."""
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", size, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"merge.max_shard_size={size!r} is not a size; write e.g. 2GB, 500MB or 1GiB")
        units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20}
        units |= {"gib": 2**30, "tib": 2**40}
        n = int(float(m.group(1)) * units.get((m.group(2) or "").lower(), 1))
        if n <= 0:
            raise ValueError(f"merge.max_shard_size={size!r} must be positive")
        return n

    @property
    def max_shard_bytes(self) -> int:
        return self.size_bytes(self.max_shard_size)


class PublishConfig(_Strict):
    """Where versions land: an fsspec URI (local folder or s3://bucket/prefix)."""

    enabled: bool = True
    store: Location = "./artifacts"
    model_name: str | None = None  # default: the run name
    version: str | None = None  # default: next free v0001, v0002, ...
    storage_options: StorageOptions = Field(default_factory=dict)
    # None: everything the run produced (adapter and merged model, or the full model).
    include: list[Literal["adapter", "merged", "model"]] | None = None

    @field_validator("model_name", "version")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not is_safe_name(v):
            raise ValueError(
                f"{v!r} is not a safe name: use letters, digits, '.', '_' and '-', starting with a letter "
                "or digit, without '..'"
            )
        return v


class CacheConfig(_Strict):
    """Stage results reused across flow runs: Prefect persists each stage's result under a key made of
    the content that determines it (docs/caching.md), and a rerun skips every stage whose key it finds."""

    enabled: bool = True
    # Where the results are persisted: a local folder (default: <cache root>/results) or any fsspec URI
    # (s3://bucket/prefix) that every worker of a cluster reaches.
    storage: Location | None = None
    storage_options: StorageOptions = Field(default_factory=dict)


# Experiment trackers a run can report to (``report_to``), and the package each one needs.
Tracker = Literal["tensorboard", "mlflow", "wandb"]
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class TrackingConfig(_Strict):
    """Options of the experiment trackers named in ``report_to`` (core/trackers.py)."""

    tensorboard_dir: str | None = None  # default: <run_dir>/tensorboard
    # default: $MLFLOW_TRACKING_URI, else a SQLite store in the run directory (sqlite:///<run_dir>/mlflow.db)
    mlflow_tracking_uri: Location | None = None
    experiment: str | None = None  # the MLflow experiment / W&B project; default: the model name
    run_name: str | None = None  # the tracker's run name; default: the run name


# Eval metrics a promotion gate can judge: exact_match and task_metric (eval.metric's mean; higher is
# better), loss and perplexity (lower).
GateMetric = Literal["exact_match", "task_metric", "loss", "perplexity"]


class MinImprovementGate(_Strict):
    """The tuned model beats the base model on an eval metric by more than ``margin``."""

    enabled: bool = True
    metric: GateMetric | None = None  # None: task_metric where the eval scored it, else loss (format text)
    margin: float = Field(0.0, ge=0.0)


class NoRegressionGate(_Strict):
    """The candidate's tuned metric is no worse than the alias's current target's by more than ``margin``,
    compared only when both were scored on the same eval rows (the same eval fingerprint)."""

    enabled: bool = True
    metric: GateMetric | None = None  # None: as min_improvement
    margin: float = Field(0.0, ge=0.0)
    # Evals of other rows cannot be compared: by default that is reported and does not block.
    require_comparable: bool = False


class MaxMergeGapGate(_Strict):
    """The merged model matches adapter-on-base: merge_report's gaps under their limits."""

    enabled: bool = True
    max_logit_gap: PositiveFloat = 1e-3  # as merge.max_logit_gap
    max_loss_gap: PositiveFloat | None = None  # |loss(merged) - loss(adapter-on-base)|; None: not checked


class MaxForgettingGate(_Strict):
    """The tuned model's loss on general text (eval.forgetting_path) rose by at most ``max_loss_increase``
    over the base's: what the fine-tune cost outside its task."""

    enabled: bool = True
    max_loss_increase: float | None = Field(None, ge=0.0)  # nats; None: not checked


class AdapterIntegrityGate(_Strict):
    """The stored adapter's tensors are present, finite and trained (not every lora_B zero)."""

    enabled: bool = True


class GatesConfig(_Strict):
    """What a promotion checks before it moves an alias (core/gates.py); each gate can be turned off."""

    min_improvement: MinImprovementGate = Field(default_factory=MinImprovementGate)
    no_regression: NoRegressionGate = Field(default_factory=NoRegressionGate)
    max_merge_gap: MaxMergeGapGate = Field(default_factory=MaxMergeGapGate)
    adapter_integrity: AdapterIntegrityGate = Field(default_factory=AdapterIntegrityGate)
    max_forgetting: MaxForgettingGate = Field(default_factory=MaxForgettingGate)


class PromoteConfig(_Strict):
    """Moving an alias (e.g. production) to a published version once its gates pass."""

    alias: str | None = None  # set: the finetune flow promotes the version it published to this alias
    fail_on_gate: bool = False  # a gate refusing that promotion fails the run (else: a warning)
    gates: GatesConfig = Field(default_factory=GatesConfig)

    @field_validator("alias")
    @classmethod
    def _safe_alias(cls, v: str | None) -> str | None:
        if v is not None and (not is_safe_name(v) or re.fullmatch(r"v\d+", v)):
            raise ValueError(
                f"{v!r} is not a usable alias: use letters, digits, '.', '_' and '-', starting with a letter "
                "or digit, without '..', and not a version-like name such as v0001 (e.g. 'production')"
            )
        return v


def _promote_problems(cfg: RunConfig) -> list[str]:
    """Gates this run's eval cannot feed: a metric it does not produce, or (for a run that promotes at
    its end, promote.alias set) no eval or no base scores at all."""
    problems = []
    gates = cfg.promote.gates
    for name in ("min_improvement", "no_regression"):
        gate = getattr(gates, name)
        if not gate.enabled:
            continue
        key = f"promote.gates.{name}"
        promotes = cfg.promote.alias is not None
        if promotes and not cfg.eval.enabled:
            problems.append(
                f"{key} judges eval metrics but eval.enabled is false; set eval.enabled: true or "
                f"{key}.enabled: false"
            )
        elif promotes and name == "min_improvement" and not cfg.eval.compare_base:
            problems.append(
                f"{key} compares tuned with base but eval.compare_base is false; set eval.compare_base: "
                f"true or {key}.enabled: false"
            )
        if gate.metric in ("exact_match", "task_metric") and cfg.data.formats == {"text"}:
            problems.append(
                f"{key}.metric is {gate.metric}, which data.format 'text' does not produce (no prompts to "
                f"answer); set {key}.metric to loss or perplexity"
            )
    forgetting = gates.max_forgetting
    if forgetting.enabled and forgetting.max_loss_increase is not None:
        if cfg.eval.forgetting_path is None or not cfg.eval.compare_base or not cfg.eval.enabled:
            problems.append(
                "promote.gates.max_forgetting.max_loss_increase is set but the eval measures no forgetting; "
                "set eval.forgetting_path to a general-text file (with eval.enabled and eval.compare_base "
                "true), or unset max_loss_increase"
            )
    if cfg.promote.alias and not cfg.publish.enabled:
        problems.append(
            "promote.alias is set but publish.enabled is false: only a published version is promoted"
        )
    return problems


def _lora(r: int, targets: str = ATTENTION, method: str = "lora") -> list[str]:
    return [f"method={method}", f"lora.r={r}", f"lora.target_modules={targets}"]


class SweepVariant(_Strict):
    """One sweep variant: a name and the dotted overrides that make it from the base config."""

    name: str
    overrides: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not is_safe_name(v):
            raise ValueError(
                f"{v!r} is not a safe variant name: use letters, digits, '.', '_' and '-' (it names the "
                "variant's run directory)"
            )
        return v

    @field_validator("overrides")
    @classmethod
    def _comparable(cls, v: list[str]) -> list[str]:
        # The sweep compares variants trained on the same data for the same steps and scored on the
        # same rows; it sets the run name, output and publishing itself.
        fixed = (
            "data.",
            "eval.",
            "train.max_steps",
            "train.epochs",
            "train.seed",
            "name",
            "output_dir",
            "publish.",
            "promote.",
            "sweep.",
        )
        for o in v:
            key = o.split("=", 1)[0].strip()
            if "=" not in o or not key:
                raise ValueError(f"override {o!r} is not KEY=VALUE (e.g. lora.r=16)")
            if key.startswith(fixed) or key in {f.rstrip(".") for f in fixed}:
                raise ValueError(
                    f"override {o!r} changes {key}, which every variant of a sweep shares (the same data, "
                    "steps, seed and eval rows); set it in the base config or with --set"
                )
        return v


# The article's comparison (README, "Sweeps"): LoRA ranks 1..64 on the attention projections, r = 16 on
# every linear layer, QLoRA r = 16, and full fine-tuning as the reference.
DEFAULT_SWEEP = [
    *(SweepVariant(name=f"lora-r{r}", overrides=_lora(r)) for r in (1, 4, 8, 16, 64)),
    SweepVariant(name="lora-r16-all", overrides=_lora(16, "all-linear")),
    SweepVariant(name="qlora-r16", overrides=_lora(16, ATTENTION_MLP, "qlora")),
    SweepVariant(name="full", overrides=["method=full"]),
]


class SweepConfig(_Strict):
    """`deltatune sweep`: variants of this config trained, scored and merged side by side (core/sweep.py)."""

    variants: list[SweepVariant] = Field(default_factory=lambda: [v.model_copy() for v in DEFAULT_SWEEP])
    # The recommendation: the variant with the fewest trainable parameters whose task metric is within
    # `tolerance` of the best (loss within `tolerance` relative where no task metric is scored).
    tolerance: float = Field(0.02, ge=0.0)
    # Rank-1 collapse warning: r=1's task metric below this share of r=4's (same method and targets).
    collapse_ratio: float = Field(0.5, gt=0.0, le=1.0)
    # Variants whose loss on eval.forgetting_path rose by more than this (nats) over the base are not
    # recommended, however well they score on the task; None: forgetting is reported, not judged.
    max_forgetting: float | None = Field(None, ge=0.0)
    concurrency: PositiveInt = 1  # variants trained at once (GPU slots permitting; 1 on a CPU)

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[SweepVariant]) -> list[SweepVariant]:
        if not v:
            raise ValueError("is empty: list at least one variant, or leave it unset for the default sweep")
        names = [x.name for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {dup}")
        return v


class RunConfig(_Strict):
    """The whole run: one YAML file, every stage's settings."""

    name: str = "run"
    method: Literal["full", "lora", "qlora"] = "lora"
    output_dir: str = "runs"  # the run directory is <output_dir>/<name>
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    # Experiment trackers (rank 0 only): per-step metrics, the config as params, eval results, the
    # published URI. Each named tracker must be installed: a missing one is a config error, not a run
    # that silently reports nowhere (README, "Experiment trackers").
    report_to: list[Tracker] = Field(default_factory=list)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, v: list[str]) -> list[str]:
        import importlib.util

        v = list(dict.fromkeys(v))  # each tracker once, in the order given
        missing = [t for t in v if importlib.util.find_spec(TRACKER_PACKAGES[t]) is None]
        if missing:
            raise ValueError(
                f"names {', '.join(map(repr, missing))}, which is not installed: pip install "
                f"{' '.join(TRACKER_PACKAGES[t] for t in missing)} (tensorboard and mlflow come with "
                "pip install 'deltatune[trackers]'), or remove it from report_to"
            )
        return v

    @field_validator("name")
    @classmethod
    def _safe_run_name(cls, v: str) -> str:
        # The run name is also the store's default model name: checked here by the store's own rule,
        # so that a name like 'a..b' fails at load and not at publish, after training.
        if not is_safe_name(v):
            raise ValueError(
                f"{v!r} is not a safe run name: use letters, digits, '.', '_' and '-', starting with a "
                "letter or digit, without '..' (it names the run directory and the published model)"
            )
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        problems: list[str] = []
        t = self.train
        if self.method == "full" and self.lora.modules_to_save:
            problems.append("lora.modules_to_save is set but method is 'full' (every module trains already)")
        if self.method == "qlora" and self.lora.init_lora_weights != "kaiming":
            problems.append(
                f"lora.init_lora_weights={self.lora.init_lora_weights} with method 'qlora': PiSSA/OLoRA change "
                "the base weights, which are 4-bit here; use method 'lora', or lora.init_lora_weights: kaiming"
            )
        if self.lora.use_dora and self.lora.init_lora_weights != "kaiming":
            problems.append(
                f"lora.use_dora with lora.init_lora_weights={self.lora.init_lora_weights}: the published "
                "rank-2r conversion of PiSSA/OLoRA has no DoRA form; use one of them, not both"
            )
        if self.lora.use_dora and self.method != "full" and t.zero_stage == 3:
            problems.append(
                "lora.use_dora with train.zero_stage=3: DoRA's column norm needs each whole base weight, "
                "which ZeRO-3 partitions; use zero_stage 0-2 (the frozen base is small next to optimizer "
                "state), or lora.use_dora: false"
            )
        if self.method == "qlora" and t.zero_stage == 3:
            problems.append(
                "train.zero_stage=3 with method 'qlora': ZeRO-3 cannot partition bitsandbytes 4-bit weights; "
                "use zero_stage 0-2 or method 'lora'"
            )
        if self.method == "qlora" and t.offload_params:
            problems.append("train.offload_params needs ZeRO-3, which method 'qlora' cannot use")
        if t.offload_params and t.zero_stage not in (None, 3):
            problems.append(f"train.offload_params needs train.zero_stage=3 (got {t.zero_stage})")
        per_step = t.grad_accum * self.world_size
        if t.batch_size % per_step != 0:
            problems.append(
                f"train.batch_size={t.batch_size} is not divisible by train.grad_accum ({t.grad_accum}) x "
                f"processes ({self.world_size}) = {per_step}: batch_size counts samples per optimizer step "
                f"over all processes; use a multiple of {per_step}"
            )
        if t.launcher == "inprocess" and t.num_processes * t.num_nodes > 1:
            problems.append(
                "train.launcher='inprocess' runs one process; set num_processes=1 or another launcher"
            )
        include = set(self.publish.include or [])
        if self.publish.enabled and "merged" in include and not self.merge.enabled and self.method != "full":
            problems.append(
                "publish.include has 'merged' but merge.enabled is false; drop it or enable merge"
            )
        # flows/finetune.py publishes what the method produced: lora/qlora an adapter and a merged
        # model, full the model. Any other name would publish nothing or something else.
        valid = ["model"] if self.method == "full" else ["adapter", "merged"]
        wrong = [x for x in self.publish.include or [] if x not in valid]
        if self.publish.enabled and wrong:
            produces = "the whole model" if self.method == "full" else "an adapter and a merged model"
            problems.append(
                f"publish.include has {', '.join(map(repr, wrong))} but method {self.method!r} produces "
                f"{produces}; valid values are {valid}"
            )
        if self.data.formats == {"text"} and self.eval.enabled and self.eval.metric != DEFAULT_METRIC:
            problems.append(
                f"eval.metric is {self.eval.metric!r} but data.format 'text' has no prompts or references: "
                f"generation is skipped for text and eval scores loss and perplexity only; leave eval.metric "
                f"at its default ({DEFAULT_METRIC}), or use data.format alpaca, completion or chat"
            )
        problems += _promote_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- derived values, not stored ------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def zero_stage(self) -> int:
        if self.train.zero_stage is not None:
            return self.train.zero_stage
        return 2 if self.method == "full" else 0

    @property
    def world_size(self) -> int:
        return self.train.num_processes * self.train.num_nodes

    @property
    def micro_batch_size(self) -> int:
        """Samples per forward pass on one process."""
        return self.train.batch_size // (self.train.grad_accum * self.world_size)


# ----------------------------------------------------------------------------------------------------
# Loading, overrides, errors
# ----------------------------------------------------------------------------------------------------


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid run config ({source}): {err.error_count()} problem(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against deploy/runs/*.yaml or the RunConfig docs"
        elif e["type"] == "credentials_in_uri":
            pass  # the value is the secret
        elif find_secrets(e.get("input")):
            pass  # never echo a value that holds a credential
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (``1e-4``, ``true``, ``[q_proj, v_proj]``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        shown = "(not shown: it holds a credential)" if value_problem(item) else repr(item)
        raise ConfigError(f"bad override {shown}: expected dotted.key=value, e.g. train.lr=1e-4")
    return key.strip().split("."), _load_yaml(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``dotted.key=value`` override applied (validated later)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"bad override {item!r}: {part!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def config_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> RunConfig:
    """Validate a plain dict into a RunConfig, reporting every problem at once.

    Raises:
        ConfigError: listing each invalid field as ``section.key: what is wrong``.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid run config ({source}): expected a mapping at the top, got {type(data).__name__}"
        )
    if found := find_secrets(data):
        # Refused before validation, by path, without the value (core/secretkeys.py has the rule).
        lines = [
            f"invalid run config ({source}): {len(found)} credential(s), which a run config must not hold"
        ]
        lines += [f"  - {line}" for line in describe(found)]
        lines.append(
            f"  run_config.yaml is published with every version and flow parameters are stored by Prefect: "
            f"{WHERE_INSTEAD}"
        )
        raise ConfigError("\n".join(lines))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or the defaults when ``path`` is None) and apply overrides.

    Args:
        path: YAML file; None uses the built-in defaults (the demo run).
        overrides: ``dotted.key=value`` strings, applied before validation.

    Raises:
        ConfigError: the file is missing, not YAML, or fails validation (every problem listed).
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(
                f"run config {p} does not exist; pass a YAML file such as deploy/runs/demo.yaml"
            )
        try:
            data = _load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"run config {p} is not valid YAML: {e}") from None
    return config_from_dict(apply_overrides(data, overrides or []), source=source)


def to_yaml(cfg: RunConfig) -> str:
    data = cfg.model_dump(mode="json")
    if cfg.data.sources:  # path stays unset with sources: writing its default back would set both
        data["data"].pop("path", None)
    return yaml.safe_dump(data, sort_keys=False)
