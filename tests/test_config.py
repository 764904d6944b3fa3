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
                                        ("idle_credit = 5\n", "unknown setting")])
def test_bad_scheduler_settings_are_refused(tmp_path, text, match):
    path = tmp_path / "fmplexd.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(str(path))
