"""reuse_freed_memory: glibc's allocator tuned inside the block, restored once outside it."""

import platform

import pytest
import torch

from lowbit import memory


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


def test_nested_blocks_tune_once_and_restore_the_defaults_once(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: fake)
    with memory.reuse_freed_memory() as on:
        assert on
        with memory.reuse_freed_memory():
            pass
        assert fake.calls == [("mallopt", memory._M_MMAP_MAX, 0),
                              ("mallopt", memory._M_TRIM_THRESHOLD, memory._KEEP)]
    assert fake.calls[2:] == [("mallopt", memory._M_MMAP_MAX, memory._DEFAULT_MMAP_MAX),
                              ("mallopt", memory._M_TRIM_THRESHOLD, memory._DEFAULT_TRIM),
                              ("trim", 0)]


def test_an_error_inside_still_restores(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: fake)

    @memory.reusing_freed_memory
    def fails():
        raise ValueError("boom")

    with pytest.raises(ValueError):
        fails()
    assert fake.calls[-1] == ("trim", 0) and memory._depth == 0


def test_without_glibc_it_does_nothing(monkeypatch):
    monkeypatch.setattr(memory, "_libc", lambda: None)
    with memory.reuse_freed_memory() as on:
        assert not on


def test_the_users_own_glibc_tuning_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    memory._libc.cache_clear()
    try:
        assert memory._libc() is None
    finally:
        memory._libc.cache_clear()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_on_glibc_large_tensors_are_computed_alike_inside():
    x = torch.randn(5_000_000)
    with memory.reuse_freed_memory() as on:
        assert on
        inside = [torch.mul(x, 3.0) for _ in range(3)][-1]
    assert torch.equal(inside, x * 3.0)
