"""Build the offline tiny Llama (BPE tokenizer + briefly pretrained model) from the bundled demo corpus.

    python -c "from core.tiny import make_tiny_model; make_tiny_model('/tmp/tiny-llama')"

`resolve_model_path("builtin:tiny-llama")` builds it once into a per-user cache and returns its path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from core.fsutil import make_temp_dir

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("tiny-llama",)
RECIPE_FILE = "tiny_model.json"
# Bump when the build procedure changes in a way the recipe dict does not capture: it moves the cache key.
RECIPE_VERSION = 1
DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "examples" / "demo" / "corpus.txt"
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# bitsandbytes' CPU 4-bit eval kernel asserts out_features % 32 == 0 (docs/environment.md); that includes lm_head.
MULTIPLE = 32


def _round_up(n: int, multiple: int = MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def _recipe(
    *,
    pretrain_steps: int,
    seed: int,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    lr: float,
) -> dict[str, Any]:
    """Validate the build settings and return them as a JSON-able dict."""
    sizes = {"hidden_size": hidden_size, "intermediate_size": intermediate_size, "vocab_size": vocab_size}
    bad = {k: v for k, v in sizes.items() if v <= 0 or v % MULTIPLE}
    if bad:
        raise ValueError(
            f"tiny model sizes must be positive multiples of {MULTIPLE} (bitsandbytes CPU kernels), got {bad}"
        )
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}"
        )
    if pretrain_steps < 0 or seq_len < 8 or batch_size < 1 or num_hidden_layers < 1:
        raise ValueError(
            f"expected pretrain_steps >= 0, seq_len >= 8, batch_size >= 1, num_hidden_layers >= 1; got "
            f"{pretrain_steps=}, {seq_len=}, {batch_size=}, {num_hidden_layers=}"
        )
    return {
        "recipe_version": RECIPE_VERSION,
        "pretrain_steps": pretrain_steps,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lr": lr,
    }


def train_tokenizer(corpus: str, vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus`.

    Args:
        corpus: The training text; paragraphs are separated by blank lines.
        vocab_size: Upper bound on the vocabulary (a repetitive corpus may saturate below it).
        model_max_length: Recorded on the tokenizer as its maximum sequence length.

    Returns:
        A fast tokenizer that prepends `<s>` to every sequence and has `</s>`, `<pad>` and `<unk>`.
    """
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.split("\n\n"), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    # Llama convention: BOS first, no EOS (the fine-tuning data code appends EOS to targets itself).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, padding_side="right", **SPECIAL_TOKENS
    )


def _token_stream(tokenizer: PreTrainedTokenizerFast, corpus: str) -> torch.Tensor:
    """The corpus as one id stream: `<s> paragraph </s>` per paragraph."""
    ids: list[int] = []
    for para in corpus.split("\n\n"):
        if para.strip():
            ids.extend(tokenizer(para.strip())["input_ids"])
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _batch(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    # (B,) window starts -> (B, T) token windows
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def _eval_loss(model: LlamaForCausalLM, batch: torch.Tensor) -> float:
    model.eval()
    loss = model(input_ids=batch, labels=batch).loss.item()
    model.train()
    return loss


def _pretrain(model: LlamaForCausalLM, stream: torch.Tensor, recipe: dict[str, Any]) -> dict[str, float]:
    """Causal-LM pretraining on random corpus windows; returns held-out loss before and after."""
    seq_len, batch_size, steps = recipe["seq_len"], recipe["batch_size"], recipe["pretrain_steps"]
    if len(stream) < 2 * seq_len + 1:
        raise ValueError(
            f"corpus has {len(stream)} tokens; need at least {2 * seq_len + 1} for seq_len={seq_len}"
        )
    # The last 5% of the stream is held out for the before/after loss, so the check is not on training windows.
    split = max(seq_len + 1, int(len(stream) * 0.95))
    split = min(split, len(stream) - seq_len)
    train, held = stream[:split], stream[split:]
    gen = torch.Generator().manual_seed(recipe["seed"])
    eval_starts = torch.randint(0, len(held) - seq_len + 1, (min(16, batch_size * 2),), generator=gen)
    eval_batch = _batch(held, eval_starts, seq_len)
    loss_before = _eval_loss(model, eval_batch)
    logger.info(
        "pretrain: %d steps, batch %d x %d tokens, eval loss before %.3f",
        steps,
        batch_size,
        seq_len,
        loss_before,
    )

    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    model.train()
    t0, train_loss = time.monotonic(), float("nan")
    log_every = max(1, steps // 5)
    for step in range(steps):
        starts = torch.randint(0, len(train) - seq_len + 1, (batch_size,), generator=gen)
        batch = _batch(train, starts, seq_len)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_loss = loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            logger.info(
                "pretrain step %d/%d loss %.3f (%.1fs)", step + 1, steps, train_loss, time.monotonic() - t0
            )
    loss_after = _eval_loss(model, eval_batch)
    logger.info(
        "pretrain done: eval loss %.3f -> %.3f in %.1fs", loss_before, loss_after, time.monotonic() - t0
    )
    return {
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "final_train_loss": train_loss,
        "pretrain_seconds": round(time.monotonic() - t0, 2),
    }


def is_complete(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a finished tiny-model build (the recipe file is written last)."""
    d = Path(out_dir)
    return all((d / f).is_file() for f in (RECIPE_FILE, "config.json", "model.safetensors", "tokenizer.json"))


def make_tiny_model(
    out_dir: str | Path,
    *,
    pretrain_steps: int = 400,
    seed: int = 0,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 256,
    vocab_size: int = 1024,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    corpus_path: str | Path | None = None,
) -> Path:
    """Train a tokenizer and a small Llama on the demo corpus and save both to `out_dir`.

    The build happens in a temporary directory beside `out_dir` that is renamed into place at the end, so
    `out_dir` is either absent or complete. A complete `out_dir` is returned as is, without rebuilding.

    Args:
        out_dir: Where to save the model, tokenizer and `tiny_model.json`.
        pretrain_steps: AdamW steps of causal-LM pretraining (the default takes about a minute on 2 cores).
        seed: Seeds weight init and the order of pretraining windows.
        hidden_size: Model width; a multiple of 32.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Attention heads; must divide `hidden_size`.
        intermediate_size: MLP width; a multiple of 32.
        vocab_size: Upper bound on the BPE vocabulary and model vocabulary size; a multiple of 32. The model
            vocabulary is the tokenizer's size rounded up to a multiple of 32.
        seq_len: Tokens per pretraining window; also the tokenizer's `model_max_length` is twice this.
        batch_size: Windows per pretraining step.
        lr: Peak AdamW learning rate (linear warmup, cosine decay to 10%).
        corpus_path: Text to train on; defaults to the repository's `examples/demo/corpus.txt`.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        FileNotFoundError: The corpus is missing.
        FileExistsError: `out_dir` exists, is not empty and is not a finished tiny-model build.
        ValueError: A size is not a positive multiple of 32 or the settings are inconsistent.
    """
    out = Path(out_dir).expanduser().resolve()
    recipe = _recipe(
        pretrain_steps=pretrain_steps,
        seed=seed,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        seq_len=seq_len,
        batch_size=batch_size,
        lr=lr,
    )
    if is_complete(out):
        saved = json.loads((out / RECIPE_FILE).read_text())
        if saved.get("recipe") != recipe:  # neither reuse it silently nor overwrite it
            raise FileExistsError(
                f"{out} holds a tiny model built with another recipe ({saved.get('recipe')}); delete it "
                "to rebuild with these settings, or choose another output directory"
            )
        logger.info("tiny model already built at %s", out)
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not a finished tiny-model build (no {RECIPE_FILE}); "
            "remove it or choose another output directory"
        )

    corpus_file = Path(corpus_path) if corpus_path is not None else DEFAULT_CORPUS
    if not corpus_file.is_file():
        raise FileNotFoundError(
            f"corpus {corpus_file} not found; run `python examples/make_demo_data.py` in a checkout of "
            "deltatune or pass corpus_path="
        )
    corpus_bytes = corpus_file.read_bytes()
    corpus = corpus_bytes.decode("utf-8")

    t0 = time.monotonic()
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus, vocab_size, model_max_length=2 * seq_len)
    model_vocab = _round_up(len(tokenizer))
    logger.info("tokenizer: %d tokens (model vocab %d)", len(tokenizer), model_vocab)
    config = LlamaConfig(
        vocab_size=model_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=2 * seq_len,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "model: %s params, hidden %d, layers %d, heads %d, mlp %d",
        f"{n_params:,}",
        hidden_size,
        num_hidden_layers,
        num_attention_heads,
        intermediate_size,
    )
    stats = _pretrain(model, _token_stream(tokenizer, corpus), recipe)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")  # the umask's mode, as any other directory
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {
            "recipe": recipe,
            "corpus_sha256": hashlib.sha256(corpus_bytes).hexdigest(),
            "tokenizer_size": len(tokenizer),
            "model_vocab_size": model_vocab,
            "num_parameters": n_params,
            **stats,
            "build_seconds": round(time.monotonic() - t0, 2),
        }
        # Written last: its presence marks the build complete (is_complete).
        (tmp / RECIPE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above); os.replace cannot overwrite a directory otherwise
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("tiny model saved to %s (%.1fs)", out, time.monotonic() - t0)
    return out


def _default_recipe_key() -> str:
    """Short hash of the default recipe and the bundled corpus: the cache directory's suffix."""
    import inspect

    params = inspect.signature(make_tiny_model).parameters
    defaults = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k != "corpus_path"}
    h = hashlib.sha256(json.dumps(_recipe(**defaults), sort_keys=True).encode())
    if DEFAULT_CORPUS.is_file():
        h.update(DEFAULT_CORPUS.read_bytes())
    return h.hexdigest()[:12]


def builtin_model_path(name: str = "tiny-llama") -> Path:
    """The cache directory for a built-in model: `$DELTATUNE_CACHE/models/<name>-<hash>`.

    `$DELTATUNE_CACHE` defaults to `~/.cache/deltatune`. The hash covers the default recipe and the bundled
    corpus, so changing either builds a fresh model instead of reusing a stale one.

    Args:
        name: A built-in model name; only `tiny-llama` exists.

    Returns:
        The path (which may not exist yet).

    Raises:
        ValueError: `name` is not a built-in model.
    """
    if name not in BUILTIN_NAMES:
        raise ValueError(f"unknown built-in model {name!r}; expected one of {list(BUILTIN_NAMES)}")
    root = Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune").expanduser()
    return root / "models" / f"{name}-{_default_recipe_key()}"


def resolve_model_path(name_or_path: str) -> str:
    """Map `builtin:tiny-llama` to its cached directory, building it on first use; pass anything else through.

    A file lock beside the cache directory keeps two processes from building it at once; the second waits
    and then finds the finished build.

    Args:
        name_or_path: `builtin:<name>`, or any `from_pretrained` source (hub id, local dir, s3:// URI).

    Returns:
        A local directory for a built-in model, otherwise `name_or_path` unchanged.
    """
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    from filelock import FileLock

    path = builtin_model_path(name_or_path[len(BUILTIN_PREFIX) :])
    if not is_complete(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            make_tiny_model(path)
    return str(path)
