"""GPU slots: the train stage holds ``train.num_processes`` slots of a Prefect global concurrency limit
(``train.gpu_slots_limit``) while it trains, so that two runs on one node never share its GPUs.

The limit is created by ``deltatune setup --gpus N`` (flows/deployments.py; README, "Deploying"). Only a
train stage that runs takes the slots: a cached one never waits behind a running training.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from core.config import RunConfig
from core.errors import DeltatuneError


class GpuSlotsError(DeltatuneError):
    """The GPU-slot limit is missing, too small or inactive on the Prefect server; not retried."""


@contextmanager
def gpu_slots(cfg: RunConfig, log: Any = None) -> Iterator[None]:
    """Hold ``train.num_processes`` slots of the global concurrency limit ``train.gpu_slots_limit`` while
    the block runs (no-op when it is None): a run that would oversubscribe the node waits for the slots.

    ``strict=True``: a missing limit is an error, not Prefect's warning and a run that takes the GPUs
    anyway. The lease is renewed while the block runs and expires on the server if this process dies.

    Raises:
        GpuSlotsError: the limit does not exist, or has fewer slots than the run takes.
    """
    name = cfg.train.gpu_slots_limit
    if not name:
        yield
        return
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    slots = cfg.train.num_processes
    if log is not None:
        log.info("train: waiting for %d GPU slot(s) of concurrency limit %r", slots, name)
    start = time.monotonic()
    with ExitStack() as stack:
        try:
            stack.enter_context(concurrency(name, occupy=slots, strict=True))
        except ConcurrencySlotAcquisitionError as e:
            raise GpuSlotsError(_slots_problem(name, slots)) from e
        if log is not None:
            log.info(
                "train: holding %d GPU slot(s) of %r (waited %.1f s)", slots, name, time.monotonic() - start
            )
        yield


def _slots_problem(name: str, slots: int) -> str:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url or "Prefect's ephemeral API"
    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return (
            f"train.gpu_slots_limit is {name!r} but {api} has no global concurrency limit of that name: "
            f"create it with `deltatune setup --gpus N` (N = this node's GPUs) against that server, or "
            "unset train.gpu_slots_limit to run without GPU slots"
        )
    except Exception as e:  # noqa: BLE001  (the report must not hide the first error)
        return f"could not take {slots} slot(s) of concurrency limit {name!r} on {api} ({e})"
    if limit.limit < slots:
        return (
            f"the run takes {slots} GPU slot(s) (train.num_processes) but concurrency limit {name!r} has "
            f"{limit.limit}: it would wait forever; lower train.num_processes or raise the limit with "
            f"`deltatune setup --gpus {slots}`"
        )
    if not limit.active:
        return f"concurrency limit {name!r} is inactive: `prefect gcl enable {name}`"
    return f"could not take {slots} slot(s) of concurrency limit {name!r} on {api}"
