"""The tasks a caller may use through the gateway: fmplexd's list_tasks (what the gateway's own uid
may see) narrowed to the tasks of the caller's owner. The list is fetched again when it is older than
TTL_S, in the background (requests go on with the list they have, so a busy daemon's control
socket never holds up the HTTP side), and at once when a request names a model that is not in it
(a task deployed a moment ago).
Canary variants (`name@canary`) are not models: requests to a task reach its canary by its split.
"""
from __future__ import annotations

import asyncio
import time

from fmplex.client import AsyncClient
from fmplex.gateway.errors import bad_request, model_not_found
from ipc.messages import Family, ListTasks, TaskStats

TTL_S = 1.0
USE = {Family.DECODER: "/v1/chat/completions or /v1/completions",
       Family.TEXT_ENCODER: "/v1/embeddings or /v1/fmplex/classifications",
       Family.VISION: "/v1/fmplex/images", Family.TIME_SERIES: "/v1/fmplex/forecasts"}


class Catalog:
    def __init__(self, client: AsyncClient, ttl_s: float = TTL_S):
        self.client, self.ttl_s = client, ttl_s
        self._tasks: list[TaskStats] | None = None
        self._at = -float("inf")
        self._fetch: asyncio.Task | None = None

    async def tasks(self, owner: int, fresh: bool = False) -> list[TaskStats]:
        """The owner's tasks (not canaries), by name; `fresh`: as fmplexd lists them now."""
        if fresh or self._tasks is None:
            await asyncio.shield(self._fetching())
        elif time.monotonic() - self._at > self.ttl_s:
            self._fetching()                # in the background; this request uses what is known
        return sorted((t for t in self._tasks if t.owner_uid == owner and "@" not in t.name),
                      key=lambda t: t.name)

    def _fetching(self) -> asyncio.Task:
        """The list_tasks call in flight (one at a time), started if there is none."""
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.get_running_loop().create_task(self._list())
            self._fetch.add_done_callback(_quiet)
        return self._fetch

    async def _list(self) -> None:
        reply = await self.client.control(ListTasks(ref=self.client.ref()))
        self._tasks, self._at = reply.tasks, time.monotonic()

    async def require(self, owner: int, model, family: Family) -> TaskStats:
        """The owner's task `model`, of `family`: 404 if it is not the owner's (or does not exist),
        400 if it is a task of another family."""
        if not isinstance(model, str) or not model:
            raise bad_request("`model` must name a task", "model")
        for fresh in (False, True):
            task = next((t for t in await self.tasks(owner, fresh) if t.name == model), None)
            if task is not None:
                break
        if task is None:
            raise model_not_found(model)
        if task.family is not family:
            raise bad_request(f"model {model} is a {task.family.value} task: use "
                              f"{USE[task.family]}", "model")
        return task


def _quiet(task: asyncio.Task) -> None:
    """A background refresh that failed: the next request fetches again."""
    if not task.cancelled():
        task.exception()
