"""Slots scale: what each region keeps for the cyclic GC to walk, and the bookkeeping that
keeps it small (a backing's one user held without a set, a whole-backing region viewing
through its backing's memoryview, one lock for every backing). No test here times anything."""

from __future__ import annotations

import gc
import threading

import pytest

from kvm_bindings import Backing
from kvm_bindings.errors import StaleHandleError

PAGE = 0x1000


def test_a_region_of_its_own_memory_keeps_at_most_five_gc_tracked_objects(vm):
    # MemoryRegion, Backing, mmap, and the memoryview (with its managed buffer) over it:
    # every full collection walks these for every live slot.
    for i in range(20):
        vm.add_memory(0x1000000 + i * PAGE, PAGE)     # warm up whatever is made once
    gc.collect()
    before = len(gc.get_objects())
    for i in range(20, 220):
        vm.add_memory(0x1000000 + i * PAGE, PAGE)
    gc.collect()
    assert (len(gc.get_objects()) - before) / 200 <= 5.05


def test_a_whole_backing_region_shares_its_view_and_a_view_held_outlives_it(vm):
    region = vm.add_memory(0x10000, PAGE)
    backing = region.backing
    held = region.view()
    held[:4] = b"kept"
    vm.remove_memory(region)
    assert region.removed and backing.closed and backing.regions == ()
    assert bytes(held[:4]) == b"kept"         # the mapping stays while the view is held
    held.release()
    assert backing._buffer is None


def test_one_user_then_two_then_none(vm):
    ram = Backing.memfd(2 * PAGE)
    a = vm.add_memory(0x200000, backing=ram, size=PAGE)
    assert ram.regions == (a,) and "slots=1" in repr(ram)
    b = vm.add_memory(0x210000, backing=ram, offset=PAGE)
    assert ram.regions == (a, b) and "slots=2" in repr(ram)
    ram.close()                                   # deferred: two slots still use it
    assert ram._buffer is not None and "2 slot(s)" in repr(ram)
    with pytest.raises(StaleHandleError):
        vm.add_memory(0x220000, backing=ram, size=PAGE)
    vm.remove_memory(a)
    assert ram.regions == (b,) and ram._buffer is not None
    vm.remove_memory(b)
    assert ram.regions == () and ram._buffer is None   # the last one gone: unmapped now


def test_set_readonly_on_a_closed_backing_with_one_or_two_users(vm):
    for users in (1, 2):
        ram = Backing.memfd(2 * PAGE)
        regions = [vm.add_memory(0x100000 * users + i * 0x10000, backing=ram, size=PAGE)
                   for i in range(users)]
        ram.close()
        new = vm.set_readonly(regions[0], True)      # replaces one that uses it: allowed
        assert new in ram.regions and regions[0] not in ram.regions
        assert len(ram.regions) == users
        for r in (new, *regions[1:]):
            vm.remove_memory(r)
        assert ram._buffer is None


def test_a_region_over_part_of_a_backing_releases_its_own_view(vm):
    ram = Backing.memfd(2 * PAGE)
    region = vm.add_memory(0x300000, backing=ram, offset=PAGE)
    assert region._view is not ram._buffer
    vm.remove_memory(region)
    assert ram._buffer is not None and ram.view()[:1] == b"\0"   # the caller's: still mapped
    ram.close()


def test_the_shared_backing_lock_is_reentrant_for_a_collection_closing_another_backing():
    # The collector may run a backing's __del__ (which closes it) while this thread holds
    # the one lock every backing shares: that must not deadlock.
    holder, other = Backing.anonymous(PAGE), Backing.anonymous(PAGE)
    done = threading.Event()

    def body() -> None:
        with holder._lock:
            other.close()
        done.set()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(10)
    assert done.is_set() and other.closed
    holder.close()
