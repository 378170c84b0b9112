"""How the ranks of one ``torchrun`` finish together, without a process group (MONAI's metric handlers would try to
gather across one): they agree on a run token through torchrun's key-value store, each rank writes its share's
records to a file stamped with the token, and rank 0 reads them all."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time as timer
import uuid
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from noder_monai.utils import write_json
from noder_monai.workflows.shares import dist_env

__all__ = ["gather_shares", "run_token", "wait_for_ranks", "write_share"]

logger = logging.getLogger(__name__)


def _store(world: int) -> dist.TCPStore:
    """torchrun's key-value store (``MASTER_ADDR``, ``MASTER_PORT``; no process group)."""
    rank, _, _ = dist_env()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=rank == 0 and not agent_store, timeout=timedelta(hours=1),
                         wait_for_workers=False)


def _prefix(name: str) -> str:
    return f"noder_monai/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/{name}"


def run_token(stage: str, summary_dir: str, world: int) -> str:
    """A token every rank of this cohort run shares: rank 0's, passed through torchrun's store.

    The key names the stage and the summary folder, and counts this rank's runs of that pair in the store itself
    (``store.add``), so ranks pair up their n-th run of the same stage into the same folder; runs of other stages
    or folders (e.g. a report drawn on rank 0 only) cannot shift the pairing.
    """
    token = uuid.uuid4().hex
    if world == 1:
        return token
    rank, _, _ = dist_env()
    store = _store(world)
    scope = _prefix(f"{stage}/{hashlib.sha256(os.path.abspath(summary_dir).encode()).hexdigest()[:16]}")
    count = store.add(f"{scope}/runs/rank{rank}", 1)
    key = f"{scope}/token/{count}"
    if rank == 0:
        store.set(key, token)
        return token
    return store.get(key).decode()


def wait_for_ranks(name: str, wait_s: float = 0.5) -> None:
    """Rank 0 waits until every rank of this ``torchrun`` run has called ``wait_for_ranks(name)``; other ranks
    only check in. Call it last, before exiting: torchrun stops every process as soon as one exits non-zero, so rank
    0, which exits with the cohort's failure count, must exit after the others finished their share. No-op outside
    torchrun."""
    rank, world, _ = dist_env()
    if world == 1:
        return
    store = _store(world)
    key = _prefix(f"finished/{name}")
    store.add(key, 1)
    if rank != 0:
        return
    waited = 0.0
    while store.add(key, 0) < world:
        if waited % 600 < wait_s:
            logger.info("rank 0: waiting for the other ranks to finish %s", name)
        timer.sleep(wait_s)
        waited += wait_s


def _share_path(summary_dir: str, stage: str, rank: int) -> str:
    return os.path.join(summary_dir, ".cohort", f"{stage}_rank{rank}.json")


def write_share(summary_dir: str, stage: str, token: str, rank: int, share: dict[str, Any]) -> str:
    """Write this rank's share (its records and counters) for rank 0, stamped with the run token."""
    return write_json({"token": token, "rank": rank, **share}, _share_path(summary_dir, stage, rank))


def gather_shares(summary_dir: str, stage: str, token: str, world: int, wait_s: float) -> tuple[dict, dict]:
    """Rank 0: every rank's records and counters of this run (files with another token are older runs'), waiting
    for the ranks still working. Returns ``(records, {rank: counters})``."""
    records: dict[str, dict] = {}
    ranks: dict[str, dict] = {}
    pending = set(range(world))
    waited = 0.0
    while pending:
        for other in sorted(pending):
            try:
                with open(_share_path(summary_dir, stage, other)) as handle:
                    document = json.load(handle)
            except (OSError, ValueError):
                continue
            if document.get("token") == token:
                records.update(document.pop("records"))
                ranks[str(other)] = {k: v for k, v in document.items() if k not in ("token", "rank")}
                pending.discard(other)
        if pending:
            if waited % 600 < wait_s:
                logger.info("rank 0: waiting for rank(s) %s to finish their share", sorted(pending))
            timer.sleep(wait_s)
            waited += wait_s
    return records, ranks
