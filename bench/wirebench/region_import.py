"""3. Import of a 100 MB shared-memory region through the handle plane: a real HandleServer in a
thread of this process grants the region by SCM_RIGHTS; a child process imports it repeatedly
(timed) and reports its memory before and after mapping and after reading every page."""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading

import numpy as np

from ipc import aio
from ipc import messages as M
from ipc.errors import ErrorCode, FmplexError

from bench.wirebench.children import Child
from bench.wirebench.plan import IMPORT_TOKEN, REGION_ELEMS, Plan, perf_ns

def child_import(path: str, imports: int) -> None:
    """Import the backbone region `imports` times over the handle plane (timed), then once more to
    measure RSS/PSS before, after mapping and after reading every page. Prints RESULT <json>."""
    import psutil
    from ipc.handles import HandleClient
    from ipc.shm import MappedRegion

    proc = psutil.Process()
    allowed = frozenset({M.RegionsGranted, M.Error})
    client = HandleClient(path)
    ref = 0

    def import_once():
        nonlocal ref
        ref += 1
        t0 = perf_ns()
        reply, fds = client.request(M.OpenRegions(ref=ref, token=IMPORT_TOKEN), allowed)
        t1 = perf_ns()
        if not isinstance(reply, M.RegionsGranted):
            raise RuntimeError(f"import refused: {reply}")
        region = MappedRegion(fds[0], reply.backbone.size)
        t2 = perf_ns()
        view = region.array(reply.backbone.entries[0])
        t3 = perf_ns()
        for fd in fds:        # mmap holds its own duplicate of the fd
            os.close(fd)
        return region, view, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)

    def mem():
        info = proc.memory_full_info()
        return {"rss": info.rss, "pss": getattr(info, "pss", None), "uss": info.uss}

    try:
        times = []
        for _ in range(imports):
            region, view, t = import_once()
            times.append(t)
            del view
            region.close()
        before = mem()
        region, view, _ = import_once()
        after_map = mem()
        total = float(view.sum(dtype=np.float64))      # reads every page of the region
        after_touch = mem()
        warm = times[1:] or times                      # the first import is reported alone
        result = {
            "imports": imports,
            "first_us": times[0][3] / 1e3,
            "median_us": statistics.median(t[3] for t in warm) / 1e3,
            "min_us": min(t[3] for t in warm) / 1e3,
            "median_request_us": statistics.median(t[0] for t in warm) / 1e3,
            "median_mmap_us": statistics.median(t[1] for t in warm) / 1e3,
            "median_view_us": statistics.median(t[2] for t in warm) / 1e3,
            "region_bytes": region.size, "view_shape": list(view.shape),
            "view_dtype": str(view.dtype), "view_readonly": not view.flags.writeable,
            "sum": total, "mem_before": before, "mem_after_map": after_map,
            "mem_after_touch": after_touch,
        }
        del view
        region.close()
    finally:
        client.close()
    print("RESULT " + json.dumps(result), flush=True)


class HandlePlaneThread:
    """A real ipc.handles.HandleServer on uvloop in a thread, granting the backbone region and a
    slot region by SCM_RIGHTS to whoever presents IMPORT_TOKEN."""

    def __init__(self, path: str, backbone_fd: int, manifest: M.Manifest, slot_fd: int,
                 slot_size: int):
        self.path = path
        self._grant = (backbone_fd, manifest, slot_fd, slot_size)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="handle-plane", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"handle plane did not start: {self._error!r}")

    def _handler(self, msg, creds, conn_id):
        backbone_fd, manifest, slot_fd, slot_size = self._grant
        if not isinstance(msg, M.OpenRegions) or msg.token != IMPORT_TOKEN:
            raise FmplexError(ErrorCode.UNAUTHORIZED, "bad token")
        return (M.RegionsGranted(ref=msg.ref, backbone=manifest, slot_size=slot_size,
                                 slot_generation=1), [backbone_fd, slot_fd])

    def _run(self) -> None:
        from ipc.handles import HandleServer

        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            server = HandleServer(self.path, self._handler, lambda conn_id, creds: None,
                                  allowed=frozenset({M.OpenRegions}), mode=0o600)
            server.start()
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                server.close()
        try:
            aio.run(main())
        except BaseException as e:   # reported by __init__ or close()
            self._error = e
            self._ready.set()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:     # loop already closed
                pass
        self._thread.join(10)


def bench_import(plan: Plan, run_dir: str) -> dict:
    from ipc.shm import create_region, export_tensors

    weights = np.ones(REGION_ELEMS, np.float32)
    t0 = perf_ns()
    fd, manifest = export_tensors("bench-backbone", {"weight": weights})
    export_s = (perf_ns() - t0) / 1e9
    del weights
    slot_size = 630_784
    slot_fd = create_region("bench-slot", slot_size)
    server = child = None
    try:
        server = HandlePlaneThread(os.path.join(run_dir, "handles.sock"), fd, manifest, slot_fd,
                                   slot_size)
        child = Child("import", server.path, "--imports", str(plan.imports))
        result = json.loads(child.wait_line("RESULT ", timeout_s=120))
    finally:
        if child is not None:
            child.close()
        if server is not None:
            server.close()
        os.close(fd)
        os.close(slot_fd)
    if result["sum"] != float(REGION_ELEMS):
        raise AssertionError(f"imported region sums to {result['sum']}, expected {REGION_ELEMS}")
    mb = 1e6
    b, m, t = result["mem_before"], result["mem_after_map"], result["mem_after_touch"]
    result.update({
        "export_s": export_s,
        "rss_growth_mb": (m["rss"] - b["rss"]) / mb,
        "rss_growth_touched_mb": (t["rss"] - b["rss"]) / mb,
        "pss_growth_mb": None if b["pss"] is None else (m["pss"] - b["pss"]) / mb,
        "pss_growth_touched_mb": None if b["pss"] is None else (t["pss"] - b["pss"]) / mb,
    })
    return result
