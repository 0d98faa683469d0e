"""Shared fixtures: sockets blocked, a fake Flowers-102 on disk, and the tiny test config."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from helpers import make_tiny_config, write_fake_flowers


@pytest.fixture(autouse=True)
def block_network(monkeypatch):
    """Nothing in the test suite may reach the network (a download attempt must fail loudly)."""

    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in tests")

    local_connect = socket.socket.connect

    def connect(self, address):
        # Unix sockets stay open: DataLoader workers hand tensors over them; they reach no network.
        if self.family == getattr(socket, "AF_UNIX", None):
            return local_connect(self, address)
        refuse()

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on shared cores OpenMP waits make them several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fake_flowers_session(tmp_path_factory) -> Path:
    """A read-only fake dataset shared by the whole session (tests must not modify it)."""
    return write_fake_flowers(tmp_path_factory.mktemp("fake-data"))


@pytest.fixture
def fake_flowers(tmp_path) -> Path:
    """A fresh fake dataset a test may damage; returns the root holding flowers-102/."""
    return write_fake_flowers(tmp_path / "data")


@pytest.fixture
def tiny_config(tmp_path, fake_flowers_session):
    """The tests' config: shared fake data, a private cache in tmp_path."""
    return make_tiny_config(fake_flowers_session, tmp_path / "cache")
