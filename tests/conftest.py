"""Session fixtures: the real embedded backbone (all-MiniLM-L6-v2) and tiny random checkpoints."""
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from fmplexd.families.embedded import embedded_path
    return embedded_path("minilm")


@pytest.fixture(scope="session")
def minilm(minilm_path):
    from fmplexd.families import load_backbone
    return load_backbone("default", minilm_path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    from testkit.tiny import write_tiny
    return write_tiny(str(tmp_path_factory.mktemp("tiny-bert")), "bert")


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> str:
    from testkit.tiny import write_tiny
    return write_tiny(str(tmp_path_factory.mktemp("tiny-roberta")), "roberta", seed=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """When a test fails, attach the logs of every daemon (and its tasks) still alive to the report,
    so a failure in CI explains itself."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        from testkit.launch import LIVE
        for daemon in LIVE:
            report.sections.append((f"fmplexd logs {daemon.dir}", daemon.logs()))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from testkit.tiny import write_tiny_llama
    return write_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))
