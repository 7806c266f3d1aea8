"""prepare: validate and tokenize the dataset into the run directory (content-hash cached)."""

from dataclasses import asdict

from prefect import get_run_logger, task

from core.config import read_resolved
from core.data import prepare_dataset
from core.modeling import load_tokenizer


@task(name="prepare", retries=0)
def prepare(run_dir: str, subdir: str = "data") -> dict:
    """Returns the PreparedData fields as strings and counts."""
    cfg = read_resolved(run_dir)
    data = prepare_dataset(cfg.data, load_tokenizer(cfg.model), f"{run_dir}/{subdir}")
    get_run_logger().info(
        "prepared %d train / %d eval rows (%s)", data.num_train, data.num_eval, data.fingerprint[:12]
    )
    return {
        k: (str(v) if v is not None and k.endswith(("_dir", "_path")) else v) for k, v in asdict(data).items()
    }
