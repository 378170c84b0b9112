"""How the ranks of one ``torchrun`` finish together, without a process group (MONAI's metric handlers would try to
gather across one): they agree on a run token through torchrun's key-value store, each rank writes its share's
records to a file stamped with the token, and rank 0 reads them all.

Every wait for another rank is bounded. Each rank beats a counter in the store every :data:`HEARTBEAT_S` seconds
from a background thread for as long as its process lives; a rank waited for that has not beaten for
:func:`rank_timeout_s` seconds (never started, or its process or node was lost) fails the wait with a
:class:`RankTimeoutError` naming it and saying what to do. A rank that is alive but slow (a long fit) keeps beating,
so it is waited for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import threading
import time as timer
import uuid
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from noder_monai.utils import write_json
from noder_monai.workflows.shares import dist_env

__all__ = ["DEFAULT_RANK_TIMEOUT_S", "HEARTBEAT_S", "RANK_TIMEOUT_ENV", "RankTimeoutError", "gather_shares",
           "rank_timeout_s", "run_token", "wait_for_ranks", "write_share"]

logger = logging.getLogger(__name__)

RANK_TIMEOUT_ENV = "NODER_RANK_TIMEOUT_S"
"""Environment variable: seconds without a sign of life after which a rank waited for counts as lost."""
DEFAULT_RANK_TIMEOUT_S = 1800.0
"""Default of :func:`rank_timeout_s`: 30 minutes without a heartbeat (a live rank beats every few seconds)."""
HEARTBEAT_S = 5.0
"""Seconds between two heartbeats of a rank."""


class RankTimeoutError(TimeoutError):
    """Another rank of the run sent no sign of life for :func:`rank_timeout_s` seconds."""


def rank_timeout_s(timeout_s: float | None = None) -> float:
    """Seconds without a sign of life after which a waited-for rank counts as lost: ``timeout_s`` if given, else
    ``$NODER_RANK_TIMEOUT_S``, else :data:`DEFAULT_RANK_TIMEOUT_S`.

    Raises:
        ValueError: naming the source, if the value is not a positive finite number.
    """
    source, value = ("timeout_s", timeout_s) if timeout_s is not None else (
        RANK_TIMEOUT_ENV, os.environ.get(RANK_TIMEOUT_ENV, DEFAULT_RANK_TIMEOUT_S))
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{source} must be a positive number of seconds, got {value!r}.")
    return seconds


def _address() -> tuple[str, int]:
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        _, world, _ = dist_env()
        raise ValueError(f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                         f"set: start the ranks with torchrun, or set MASTER_ADDR and MASTER_PORT to rank 0's host and "
                         f"a free port on every rank.")
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


@functools.lru_cache(maxsize=None)
def _connect(host: str, port: int, world: int, rank: int, host_store: bool, timeout_s: float) -> dist.TCPStore:
    try:
        return dist.TCPStore(host, port, world, is_master=host_store, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except Exception as error:  # DistStoreError, RuntimeError, OSError: unreachable or timed out
        raise RankTimeoutError(
            f"rank {rank}: cannot reach the run's key-value store at {host}:{port} within {timeout_s:g} s ({error}); "
            f"check that rank 0 is running and MASTER_ADDR/MASTER_PORT name it, or set {RANK_TIMEOUT_ENV} to wait "
            f"longer."
        ) from error


def _store(world: int, timeout_s: float) -> dist.TCPStore:
    """torchrun's key-value store (``MASTER_ADDR``, ``MASTER_PORT``; no process group), one client per process
    (rank 0 hosts it when torchrun's agent does not); this rank's heartbeat starts with it."""
    rank, _, _ = dist_env()
    host, port = _address()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = _connect(host, port, world, rank, rank == 0 and not agent_store, timeout_s)
    _start_heartbeat(host, port, world, rank, timeout_s)
    return store


def _prefix(name: str) -> str:
    return f"noder_monai/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/{name}"


def _beat_key(rank: int) -> str:
    return _prefix(f"alive/rank{rank}")


@functools.lru_cache(maxsize=None)
def _start_heartbeat(host: str, port: int, world: int, rank: int, timeout_s: float) -> threading.Thread:
    """A daemon thread that adds 1 to this rank's beat counter every :data:`HEARTBEAT_S` seconds (its own store
    client); it stops with the process, or when the store is gone."""

    def beat() -> None:
        try:
            store = dist.TCPStore(host, port, world, is_master=False, timeout=timedelta(seconds=timeout_s),
                                  wait_for_workers=False)
            while True:
                store.add(_beat_key(rank), 1)
                timer.sleep(HEARTBEAT_S)
        except Exception:  # noqa: BLE001 - the store went away: nothing left to beat for
            return

    thread = threading.Thread(target=beat, name=f"noder-heartbeat-rank{rank}", daemon=True)
    thread.start()
    return thread


def _await_ranks(store: dist.TCPStore, pending: Callable[[], Iterable[int]], what: str, timeout_s: float,
                 wait_s: float) -> None:
    """Poll ``pending()`` (the ranks not done yet) until it is empty; raise :class:`RankTimeoutError` naming the
    ranks whose beat counter has not moved for ``timeout_s`` seconds (measured on this rank's clock)."""
    beats: dict[int, int] = {}
    seen: dict[int, float] = {}
    last_log = -math.inf
    while True:
        waiting = sorted(pending())
        if not waiting:
            return
        now = timer.monotonic()
        for rank in waiting:
            count = store.add(_beat_key(rank), 0)
            if beats.get(rank) != count:
                beats[rank], seen[rank] = count, now
        lost = [rank for rank in waiting if now - seen[rank] > timeout_s]
        if lost:
            never = [rank for rank in lost if beats[rank] == 0]
            raise RankTimeoutError(
                f"rank 0: rank(s) {lost} sent no sign of life for {timeout_s:g} s while it waited for {what}"
                + (f" (rank(s) {never} never started)" if never else " (their process or node was lost)")
                + f". Check those ranks' logs and rerun the same command (finished subjects are skipped), or set "
                f"{RANK_TIMEOUT_ENV} to wait longer."
            )
        if now - last_log >= 600:
            last_log = now
            logger.info("rank 0: waiting for rank(s) %s to finish %s", waiting, what)
        timer.sleep(wait_s)


def run_token(stage: str, summary_dir: str, world: int, timeout_s: float | None = None) -> str:
    """A token every rank of this cohort run shares: rank 0's, passed through torchrun's store.

    The key names the stage and the summary folder, and counts this rank's runs of that pair in the store itself
    (``store.add``), so ranks pair up their n-th run of the same stage into the same folder; runs of other stages
    or folders (e.g. a report drawn on rank 0 only) cannot shift the pairing.

    Raises:
        RankTimeoutError: on a rank other than 0, naming rank 0, when the store or rank 0's token does not come
            within :func:`rank_timeout_s` seconds.
    """
    token = uuid.uuid4().hex
    if world == 1:
        return token
    seconds = rank_timeout_s(timeout_s)
    rank, _, _ = dist_env()
    store = _store(world, seconds)
    scope = _prefix(f"{stage}/{hashlib.sha256(os.path.abspath(summary_dir).encode()).hexdigest()[:16]}")
    count = store.add(f"{scope}/runs/rank{rank}", 1)
    key = f"{scope}/token/{count}"
    if rank == 0:
        store.set(key, token)
        return token
    try:
        store.wait([key], timedelta(seconds=seconds))
    except Exception as error:  # DistStoreError / RuntimeError on timeout
        raise RankTimeoutError(
            f"rank {rank}: rank 0 did not start the {stage} run within {seconds:g} s ({error}); check that rank 0 is "
            f"running the same command, or set {RANK_TIMEOUT_ENV} to wait longer."
        ) from error
    return store.get(key).decode()


def wait_for_ranks(name: str, wait_s: float = 0.5, timeout_s: float | None = None) -> None:
    """Rank 0 waits until every rank of this ``torchrun`` run has called ``wait_for_ranks(name)``; other ranks
    only check in. Call it last, before exiting: torchrun stops every process as soon as one exits non-zero, so rank
    0, which exits with the cohort's failure count, must exit after the others finished their share. No-op outside
    torchrun.

    Raises:
        RankTimeoutError: on rank 0, naming the ranks that have not checked in and sent no heartbeat for
            :func:`rank_timeout_s` seconds.
    """
    rank, world, _ = dist_env()
    if world == 1:
        return
    seconds = rank_timeout_s(timeout_s)
    store = _store(world, seconds)
    key = _prefix(f"finished/{name}")
    store.set(f"{key}/rank{rank}", "1")
    if rank != 0:
        return
    _await_ranks(store, lambda: [r for r in range(1, world) if not store.check([f"{key}/rank{r}"])], name, seconds,
                 wait_s)


def _share_path(summary_dir: str, stage: str, rank: int) -> str:
    return os.path.join(summary_dir, ".cohort", f"{stage}_rank{rank}.json")


def write_share(summary_dir: str, stage: str, token: str, rank: int, share: dict[str, Any]) -> str:
    """Write this rank's share (its records and counters) for rank 0, stamped with the run token."""
    return write_json({"token": token, "rank": rank, **share}, _share_path(summary_dir, stage, rank))


def gather_shares(summary_dir: str, stage: str, token: str, world: int, wait_s: float,
                  timeout_s: float | None = None) -> tuple[dict, dict]:
    """Rank 0: every rank's records and counters of this run (files with another token are older runs'), waiting
    for the ranks still working. Returns ``(records, {rank: counters})``.

    Raises:
        RankTimeoutError: naming the ranks whose share is missing and that sent no heartbeat for
            :func:`rank_timeout_s` seconds.
    """
    records: dict[str, dict] = {}
    ranks: dict[str, dict] = {}
    pending = set(range(world))

    def still_pending() -> set[int]:
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
        return pending

    seconds = rank_timeout_s(timeout_s)
    _await_ranks(_store(world, seconds), still_pending, f"their {stage} share", seconds, wait_s)
    return records, ranks
