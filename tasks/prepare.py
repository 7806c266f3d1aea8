"""prepare: validate and tokenize the dataset into the run directory (content-hash cached)."""

from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task

from core.data import prepare_dataset
from core.modeling import load_tokenizer
from core.run import RunDir
from core.stages import snapshot


@task(name="prepare", retries=0)
def prepare(run_dir: str, key: str, node: int = 0) -> dict:
    """Returns the PreparedData fields (paths as strings) and the snapshot of its files.
    ``key`` (core.stages) is the cache key: the data bytes, tokenizer and options."""
    rd = RunDir(run_dir)
    cfg = rd.config()
    data = prepare_dataset(cfg.data, load_tokenizer(cfg.model), rd.data_dir(node))
    get_run_logger().info(
        "prepared %d train / %d eval rows (%s)", data.num_train, data.num_eval, data.fingerprint[:12]
    )
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(data).items()}
    return {**out, "files": snapshot([data.train_dir, data.eval_dir, data.report_path])}
