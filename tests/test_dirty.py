"""Dirty logs as bitmaps (DirtyBitmap), clearing them by bitmap and by range, and the dirty ring.

The guest (dirty_pages.S) writes one byte to each GPA the host lists, then exits on port
0x10; the logged slot holds no code, stack or table, so its dirty pages are exactly those.
"""

from __future__ import annotations

import ctypes
import pickle
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_bindings import StaleHandleError, abi, x86
from kvm_bindings.dirty import DirtyBitmap, _range_bitmap
from kvm_bindings.memory import PAGE_SIZE

LOGGED = 0x100000               # the logged slot: 200 pages, so its bitmap is 4 words, the last partial
PAGES = 200
LIST_ADDR = 0x2000
# Runs and gaps, a run across the word boundary at page 64 and one across 128, the last page.
WRITTEN = [0, 1, 2, 5, 62, 63, 64, 65, 100, 127, 128, 190, 199]
WRITTEN_RUNS = [(0, 3), (5, 1), (62, 4), (100, 1), (127, 2), (190, 1), (199, 1)]


def gpas(pages):
    return [LOGGED + p * PAGE_SIZE for p in pages]


def bitmap_bytes(pages, total=PAGES):
    return sum(1 << p for p in pages).to_bytes((total + 63) // 64 * 8, "little")


@pytest.fixture
def dirtying(vm, assemble):
    """(region, write(pages)): a logged slot of PAGES pages at LOGGED, and a guest that writes
    one byte at a different offset of each listed page (in the order given) when asked."""
    region = vm.add_memory(LOGGED, PAGES * PAGE_SIZE, log_dirty=True)
    vm.memory.write(0x1000, assemble("dirty_pages"))
    vcpu = vm.create_vcpu(0)
    x86.setup_protected_mode(vcpu, vm.memory, 0x1000, gdt_addr=0x500, stack=0x8000)

    def write(pages):
        addrs = [LOGGED + p * PAGE_SIZE + (p * 37) % PAGE_SIZE for p in pages]
        vm.memory.write(LIST_ADDR, struct.pack(f"<I{len(addrs)}I", len(addrs), *addrs))
        e = vcpu.run()
        assert e.reason.name == "IO" and e.port == 0x10, e
    return region, write


@pytest.fixture
def manual(vm):
    """Manual protect: reading the log no longer resets it; clear_dirty_log() does."""
    vm.enable_cap(abi.Capability.MANUAL_DIRTY_LOG_PROTECT2, abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)


# ---- what the bitmap says about a guest's writes --------------------------------------

def test_dirty_bitmap_lists_exactly_the_pages_the_guest_wrote(vm, dirtying):
    region, write = dirtying
    assert not vm.get_dirty_log(region)          # nothing written yet
    write(WRITTEN[::-1])                         # order of writes does not matter
    log = vm.get_dirty_log(region)
    assert isinstance(log, DirtyBitmap)
    assert (log.base, log.pages, log.region) == (LOGGED, PAGES, region)
    assert len(log) == len(WRITTEN)
    assert list(log) == gpas(WRITTEN)
    assert list(log.runs()) == [(LOGGED + p * PAGE_SIZE, n) for p, n in WRITTEN_RUNS]
    assert bytes(log) == bitmap_bytes(WRITTEN)   # the buffer is KVM's bitmap, as KVM filled it
    assert memoryview(log).nbytes == 32
    assert all(gpa + 0x123 in log for gpa in gpas(WRITTEN))
    assert not any(gpa in log for gpa in gpas(set(range(PAGES)) - set(WRITTEN)))
    assert LOGGED - PAGE_SIZE not in log and LOGGED + PAGES * PAGE_SIZE not in log
    assert not vm.get_dirty_log(region)          # without manual protect, reading resets it


def test_bitmap_is_the_buffer_kvm_filled_not_a_copy(vm, dirtying):
    region, write = dirtying
    write([3])
    log = vm.get_dirty_log(region)
    view = memoryview(log)
    view[0] |= 1                                  # the same bytes len() and runs() read
    assert list(log.runs()) == [(LOGGED, 1), (LOGGED + 3 * PAGE_SIZE, 1)] and len(log) == 2


def test_clear_by_bitmap_re_protects_exactly_its_pages(vm, dirtying, manual):
    region, write = dirtying
    write(WRITTEN)
    log = vm.get_dirty_log(region)
    assert list(vm.get_dirty_log(region)) == gpas(WRITTEN)    # reading no longer resets
    vm.clear_dirty_log(region, log)
    assert not vm.get_dirty_log(region)
    again = [1, 2, 3, 64, 199]                   # some written before (re-protected), some not
    write(again)
    assert list(vm.get_dirty_log(region)) == gpas(again)
    # An edited bitmap clears only the pages still set in it.
    log = vm.get_dirty_log(region)
    memoryview(log)[8] = 0                       # keep page 64 dirty
    vm.clear_dirty_log(region, log)
    assert list(vm.get_dirty_log(region)) == gpas([64])


def test_clear_by_any_buffer_reads_it_as_kvms_bitmap(vm, dirtying, manual):
    region, write = dirtying
    write(WRITTEN)
    vm.clear_dirty_log(region, bitmap_bytes([0, 63, 64, 199]))          # read-only bytes
    assert list(vm.get_dirty_log(region)) == gpas(sorted(set(WRITTEN) - {0, 63, 64, 199}))
    vm.clear_dirty_log(region, bytearray(bitmap_bytes([1, 2])))         # writable
    assert list(vm.get_dirty_log(region)) == gpas(sorted(set(WRITTEN) - {0, 1, 2, 63, 64, 199}))
    words = (ctypes.c_uint64 * 4)(0, 1 << (100 - 64))                    # ctypes, as in C
    vm.clear_dirty_log(region, words)
    assert list(vm.get_dirty_log(region)) == gpas([5, 62, 65, 127, 128, 190])


@pytest.mark.parametrize("pages", [range(60, 130), range(64, 128), range(0, 1), range(190, PAGES),
                                   range(199, 200), range(0, PAGES), range(5, 5)])
def test_clear_by_range_re_protects_exactly_those_pages(vm, dirtying, manual, pages):
    region, write = dirtying
    write(WRITTEN)
    vm.clear_dirty_log(region, pages)
    left = [p for p in WRITTEN if p not in pages]
    assert list(vm.get_dirty_log(region)) == gpas(left)
    write([0, 64, 129, 199])                     # cleared pages show again once written again
    assert list(vm.get_dirty_log(region)) == gpas(sorted(set(left) | {0, 64, 129, 199}))


def test_clear_without_pages_clears_the_whole_region(vm, dirtying, manual):
    region, write = dirtying
    write(WRITTEN)
    vm.clear_dirty_log(region)
    assert not vm.get_dirty_log(region)
    write([199])
    assert list(vm.get_dirty_log(region)) == gpas([199])


# ---- misuse -------------------------------------------------------------------------

def test_clear_refuses_a_buffer_of_the_wrong_size(vm, dirtying, manual):
    region, write = dirtying
    write(WRITTEN)
    for wrong in (bytes(24), bytes(40), bytes(25)):
        with pytest.raises(ValueError, match="slot of 200 pages is 32 contiguous bytes"):
            vm.clear_dirty_log(region, wrong)
    with pytest.raises(TypeError, match="DirtyBitmap, a buffer or a range"):
        vm.clear_dirty_log(region, [LOGGED])     # type: ignore[arg-type]
    assert list(vm.get_dirty_log(region)) == gpas(WRITTEN)   # nothing was cleared


def test_clear_refuses_a_range_outside_the_slot_or_with_a_step(vm, dirtying, manual):
    region, write = dirtying
    write(WRITTEN)
    for bad in (range(190, 201), range(-1, 3)):
        with pytest.raises(ValueError, match=r"not all in the slot: its pages are 0\.\.199"):
            vm.clear_dirty_log(region, bad)
    with pytest.raises(ValueError, match="step 1"):
        vm.clear_dirty_log(region, range(0, 10, 2))
    assert list(vm.get_dirty_log(region)) == gpas(WRITTEN)


def test_clear_refuses_a_bitmap_of_another_region(vm, dirtying, manual):
    region, write = dirtying
    other = vm.add_memory(0x200000, PAGES * PAGE_SIZE, log_dirty=True)
    write(WRITTEN)
    with pytest.raises(ValueError, match="covers 200 pages from 0x200000"):
        vm.clear_dirty_log(region, vm.get_dirty_log(other))
    assert list(vm.get_dirty_log(region)) == gpas(WRITTEN)


def test_a_removed_region_is_refused_by_get_and_clear(vm, manual):
    region = vm.add_memory(0x200000, PAGES * PAGE_SIZE, log_dirty=True)
    log = vm.get_dirty_log(region)
    vm.remove_memory(region)
    vm.add_memory(0x300000, PAGES * PAGE_SIZE, log_dirty=True)        # the same slot number
    for call in (lambda: vm.get_dirty_log(region), lambda: vm.clear_dirty_log(region, log),
                 lambda: vm.clear_dirty_log(region, range(3))):
        with pytest.raises(StaleHandleError, match="was removed"):
            call()


def test_a_region_without_dirty_logging_is_refused(vm, manual):
    region = vm.add_memory(0x200000, PAGES * PAGE_SIZE)
    for call in (lambda: vm.get_dirty_log(region), lambda: vm.clear_dirty_log(region)):
        with pytest.raises(ValueError, match="dirty logging is off"):
            call()


def test_bitmap_refuses_byte_sequence_calls_that_would_mean_something_else(vm, dirtying):
    region, write = dirtying
    write([0])
    log = vm.get_dirty_log(region)
    for call in (lambda: log[0], log.clear, lambda: log.remove(LOGGED), log.pop,
                 lambda: reversed(log)):
        with pytest.raises(TypeError, match="a set of dirty pages, not a byte sequence"):
            call()
    log.append(1)                                # bytearray's own resizing: caught at use
    with pytest.raises(ValueError, match="resized to 33 bytes"):
        len(log)


def test_bitmap_built_by_hand_is_checked_against_kvms_layout():
    assert list(DirtyBitmap(bitmap_bytes([3, 70]), LOGGED, PAGES)) == gpas([3, 70])
    with pytest.raises(ValueError, match="200 pages is 32 bytes"):
        DirtyBitmap(bytes(24), LOGGED, PAGES)
    with pytest.raises(ValueError, match="past the last page"):
        DirtyBitmap(bitmap_bytes([200], 256), LOGGED, PAGES)
    with pytest.raises(ValueError, match="page-aligned"):
        DirtyBitmap(bytes(8), 0x123)


def test_bitmap_copies_and_pickles_as_data():
    log = DirtyBitmap(bitmap_bytes([3, 70]), LOGGED, PAGES)
    for twin in (log.copy(), pickle.loads(pickle.dumps(log))):
        assert twin == log and twin is not log and list(twin) == gpas([3, 70])
    assert log != DirtyBitmap(bitmap_bytes([3, 70]), LOGGED + PAGE_SIZE * 256, PAGES)
    assert log != DirtyBitmap(bitmap_bytes([3]), LOGGED, PAGES)


# ---- the bitmap against a plain reference, on random bitmaps -------------------------

def reference_runs(bits):
    runs, start = [], None
    for page, bit in enumerate(bits + [0]):
        if bit and start is None:
            start = page
        elif not bit and start is not None:
            runs.append((start, page - start))
            start = None
    return runs


# Segments of clear or set bits: long ones make whole 0 and ~0 words (the skipped kind),
# short ones mixed words; total lengths land on and off word boundaries.
segments = st.lists(st.tuples(st.booleans(), st.one_of(st.integers(1, 70), st.integers(60, 3000))),
                    max_size=40)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(segments, st.integers(0, 63), st.integers(0, 1 << 20))
def test_runs_len_and_iteration_match_a_bit_by_bit_reference(segs, extra, base_page):
    bits = [int(value) for value, n in segs for _ in range(n)] + [0] * extra
    if not bits:
        bits = [0]
    pages = len(bits)
    data = sum(1 << p for p, b in enumerate(bits) if b).to_bytes((pages + 63) // 64 * 8, "little")
    base = base_page * PAGE_SIZE
    log = DirtyBitmap(data, base, pages)
    dirty = [p for p, b in enumerate(bits) if b]
    assert len(log) == len(dirty)
    assert bool(log) == bool(dirty)
    assert list(log) == [base + p * PAGE_SIZE for p in dirty]
    assert list(log.runs()) == [(base + p * PAGE_SIZE, n) for p, n in reference_runs(bits)]
    probe = [0, pages - 1, pages // 2, *dirty[:3]]
    assert [base + p * PAGE_SIZE in log for p in probe] == [bool(bits[p]) for p in probe]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 1000).flatmap(lambda total: st.tuples(
    st.just(total), st.integers(0, total), st.integers(0, total))))
def test_range_bitmap_sets_exactly_the_range_in_the_words_kvm_accepts(case):
    total, a, b = case
    start, stop = min(a, b), max(a, b)
    span = _range_bitmap(range(start, stop), total)
    if start == stop:
        assert span is None
        return
    assert span is not None
    first, count, bitmap = span
    assert first % 64 == 0 and (count % 64 == 0 or first + count == total)   # KVM's rule
    assert len(bitmap) == (count + 63) // 64 * 8
    set_pages = [first + i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]
    assert set_pages == list(range(start, stop))


# ---- the dirty ring --------------------------------------------------------------------

def test_dirty_ring_harvests_exactly_the_written_pages_across_its_wrap(kvm, assemble):
    with kvm.create_vm() as vm:
        if not (vm.check_extension(abi.Capability.DIRTY_LOG_RING_ACQ_REL)
                or vm.check_extension(abi.Capability.DIRTY_LOG_RING)):
            pytest.skip("no dirty ring on this kernel")
        vm.enable_dirty_ring(1024)              # room for Intel's PML reserve too
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0x10000)
        region = vm.add_memory(LOGGED, PAGES * PAGE_SIZE, log_dirty=True)
        vm.memory.write(0x1000, assemble("dirty_pages"))
        vcpu = vm.create_vcpu(0)
        x86.setup_protected_mode(vcpu, vm.memory, 0x1000, gdt_addr=0x500, stack=0x8000)
        # 7 x 150..200 entries through a ring of 1024: the sixth harvest wraps round.
        rounds = (range(0, 150), range(50, 200), range(10, 160), range(0, 200), range(0, 200),
                  range(20, 190), range(0, 180))
        for round_, pages in enumerate(rounds):
            addrs = [LOGGED + p * PAGE_SIZE for p in pages]
            vm.memory.write(LIST_ADDR, struct.pack(f"<I{len(addrs)}I", len(addrs), *addrs))
            e = vcpu.run()
            assert e.reason.name == "IO", (round_, e)
            got = vcpu.harvest_dirty_ring()
            assert sorted(got) == [(region.slot, p) for p in pages], round_
            assert vcpu.harvest_dirty_ring() == []            # each entry harvested once
            vm.reset_dirty_rings()


def reference_harvest(ring, first, entries):
    """Entry by entry, through ctypes: what harvest_dirty_ring() did before it read in bulk."""
    gfns = (abi.kvm_dirty_gfn * entries).from_buffer(ring)
    out = []
    while gfns[first % entries].flags & abi.KVM_DIRTY_GFN_F_DIRTY:
        gfn = gfns[first % entries]
        out.append((gfn.slot, gfn.offset))
        gfn.flags = abi.KVM_DIRTY_GFN_F_RESET
        first += 1
        del gfn
    del gfns
    return out, first


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.integers(0, 1000), st.integers(0, 256), st.sampled_from([0, abi.KVM_DIRTY_GFN_F_RESET]))
def test_ring_harvest_matches_an_entry_by_entry_reference(first, published, stop_flag):
    """A ring of 256 entries in ordinary memory: `published` entries from `first` on carry
    DIRTY (wrapping round the end), the one after them 0 or RESET; both harvests must
    return the same entries and leave the same bytes behind."""
    import mmap

    from kvm_bindings.dirty import _harvest_ring
    entries = 256
    rings = [mmap.mmap(-1, entries * 16) for _ in range(2)]
    for ring in rings:
        for i in range(published):
            gfns = (abi.kvm_dirty_gfn * entries).from_buffer(ring)
            gfns[(first + i) % entries] = abi.kvm_dirty_gfn(
                flags=abi.KVM_DIRTY_GFN_F_DIRTY, slot=i % 3 | (i % 2) << 16, offset=i * 7919)
            if published < entries:
                gfns[(first + published) % entries].flags = stop_flag
            del gfns
    got = _harvest_ring(rings[0], first, entries)
    assert got == reference_harvest(rings[1], first, entries)
    assert len(got[0]) == published and rings[0][:] == rings[1][:]


def test_a_bitmap_equals_the_list_of_gpas_it_holds():
    # get_dirty_log() used to return a list: comparing with one keeps its meaning (an old
    # caller's `== [0x3000]` must not turn silently False).
    bm = DirtyBitmap(bytes([0b101, 0, 0, 0, 0, 0, 0, 0]), base=0x10000, pages=64)
    assert bm == [0x10000, 0x12000] and bm == (0x10000, 0x12000)
    assert bm != [0x10000] and bm != []
