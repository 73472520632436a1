"""Shared fixtures: the tiny SDXL, written once per test session and loaded once.

- ``tiny_sdxl``: paths of the tiny model (``.single_file``: original-layout ``tiny_sdxl.safetensors``;
  ``.diffusers_dir``: the same weights as a diffusers folder beside it, also the single file's config folder).
- ``no_network``: any socket resolve or connect fails the test (offline loading checks).
- ``tiny_models``: ``library.model.loading.SDXLModels`` loaded from the single file in fp32 (shared: tests that change
  the models must work on copies).
- every test runs with ``LORAPLUS_STRICT_REPORTS=1``: a run report the trainer cannot write raises (in training it is
  a warning line), so a bug in the report fails the test that meets it; a test of that warning unsets it.

A test that uses one of the module fixtures in ``TRAINING_FIXTURES`` (each trains the tiny model, tens of seconds on 2
cores) is marked ``slow``: ``make test-fast`` leaves it out, ``make test`` runs it.
"""

from __future__ import annotations

import socket

import pytest

TRAINING_FIXTURES = frozenset({"validated_runs", "runs", "state_folder", "trained_file", "uninterrupted"})


def pytest_configure(config: pytest.Config) -> None:
    """Signals as in a terminal, however the suite was started: a shell starts a background job (`cmd &`, nohup)
    with SIGINT ignored, and the tests of Ctrl-C and SIGTERM (and every child process they start, which inherits
    an ignored signal) would then fail."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sigterm = getattr(signal, "SIGTERM", None)
    if sigterm is not None and signal.getsignal(sigterm) == signal.SIG_IGN:
        signal.signal(sigterm, signal.SIG_DFL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """The tiny SDXL written to a session temp folder (seed 0, fp32)."""
    from tools.make_tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


@pytest.fixture(scope="session")
def tiny_models(tiny_sdxl):
    """The tiny SDXL loaded from its single file with ``load_sdxl`` (fp32, eval mode, CPU)."""
    import torch

    from library.model.loading import load_sdxl

    return load_sdxl(tiny_sdxl.single_file, dtype=torch.float32)


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to resolve or connect, whatever HF_HUB_OFFLINE says."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def strict_reports(monkeypatch):
    """A report error raises in tests instead of being a warning (library.train.report_files.STRICT_ENV)."""
    monkeypatch.setenv("LORAPLUS_STRICT_REPORTS", "1")
