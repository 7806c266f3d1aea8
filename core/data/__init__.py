"""Training data: sources -> rows -> segments -> token ids, validated, split and cached by content hash.

prep = prepare_dataset(cfg.data, tokenizer, run_dir / "data")   # -> train/, eval/, prepare_report.json
train = load_split(prep.train_dir); batch = collate(train[:8] rows, pad_id=tokenizer.pad_token_id)

Modules: sources (files, URIs, hub ids), formats (rows -> trained/untrained segments), encode (segments ->
ids and labels), prepare (the stage: checks, report, split, cache), batches (load_split, collate).
"""

from core.data.batches import collate, load_split, trained_tokens
from core.data.encode import IGNORE_INDEX, tokenizer_identity
from core.data.errors import DataError
from core.data.formats import PROMPT_TEMPLATE_ALPACA, PROMPT_TEMPLATE_ALPACA_NO_INPUT
from core.data.prepare import PreparedData, data_cache_dir, prepare_dataset, source_fingerprint
from core.data.sources import text_rows

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE_ALPACA",
    "PROMPT_TEMPLATE_ALPACA_NO_INPUT",
    "DataError",
    "PreparedData",
    "collate",
    "data_cache_dir",
    "load_split",
    "prepare_dataset",
    "source_fingerprint",
    "text_rows",
    "tokenizer_identity",
    "trained_tokens",
]
