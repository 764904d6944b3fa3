"""A task's own reports reach every client through the task listing: the largest values a task may
send (CacheStats counters up to 2**64 - 1, summed over sessions) still give a TaskList that
decodes. The fuzzer found a listing that no client could read after one fuzzed cache_stats."""
from __future__ import annotations

from types import SimpleNamespace

from fmplexd.registry import STAT_MAX, TaskEntry
from ipc import codec
from ipc.messages import CacheStats, ExtensionSpec, TaskConfig, TaskList

TOP = 2**64 - 1


def test_the_largest_cache_reports_still_give_a_decodable_task_list():
    report = codec.decode([bytes(f) for f in codec.encode(
        CacheStats(epoch=1, hits=TOP, misses=TOP, entries=TOP, bytes=TOP))])   # accepted as sent
    entry = TaskEntry(TaskConfig(name="t", owner_uid=0), ExtensionSpec(),
                      SimpleNamespace(version=1), session=1)
    entry.cache_before = (TOP, TOP)                       # an earlier session reported the same
    entry.cache = (report.hits, report.misses, report.bytes)
    stats = entry.stats(queued=0, served_tokens=0, overloaded=0, now=0.0)
    assert (stats.cache_hits, stats.cache_misses, stats.cache_bytes) == (STAT_MAX,) * 3
    got = codec.decode([bytes(f) for f in codec.encode(TaskList(ref=1, tasks=[stats]))])
    assert got.tasks[0].cache_misses == STAT_MAX


def test_counts_within_range_are_summed_over_sessions_unchanged():
    entry = TaskEntry(TaskConfig(name="t", owner_uid=0), ExtensionSpec(),
                      SimpleNamespace(version=1), session=1)
    entry.cache_before, entry.cache = (5, 7), (2, 3, 4096)
    stats = entry.stats(queued=0, served_tokens=0, overloaded=0, now=0.0)
    assert (stats.cache_hits, stats.cache_misses, stats.cache_bytes) == (7, 10, 4096)
