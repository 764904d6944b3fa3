"""fmplexd.toml: the scheduler's settings reach DaemonConfig; bad values are refused by name."""
import pytest

from fmplexd.config import DaemonConfig, load_config


def test_defaults_give_bounded_idle_credit():
    cfg = DaemonConfig()
    assert cfg.idle_credit_tokens == 512 and cfg.batch_target_ms == 50


def test_scheduler_settings_are_read_from_the_file(tmp_path):
    path = tmp_path / "fmplexd.toml"
    path.write_text("idle_credit_tokens = 0\nbatch_target_ms = 20\n")
    cfg = load_config(str(path))
    assert (cfg.idle_credit_tokens, cfg.batch_target_ms) == (0, 20)


@pytest.mark.parametrize("text,match", [("idle_credit_tokens = -1\n", "idle_credit_tokens"),
                                        ("idle_credit = 5\n", "unknown setting"),
                                        ("gil_switch_ms = 0\n", "gil_switch_ms")])
def test_bad_scheduler_settings_are_refused(tmp_path, text, match):
    path = tmp_path / "fmplexd.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(str(path))


def test_lanes_and_threads_use_every_core_and_no_more(monkeypatch):
    import os
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert DaemonConfig().lanes_and_threads() == (8, 1)              # one lane per core
    assert DaemonConfig(executor_lanes=2).lanes_and_threads() == (2, 4)
    assert DaemonConfig(executor_lanes=3).lanes_and_threads() == (3, 2)   # never oversubscribed
    assert DaemonConfig(threads=3).lanes_and_threads() == (8, 3)     # as the operator says
    # decoders only (no backbone's works may run side by side): one lane with every core
    assert DaemonConfig().lanes_and_threads(concurrent=False) == (1, 8)
    assert DaemonConfig(executor_lanes=2).lanes_and_threads(concurrent=False) == (2, 4)
