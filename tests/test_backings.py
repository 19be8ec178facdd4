"""Guest memory from any backing: memfds, files, hugepages, a caller's buffer; aliases of one
backing at several GPAs and in several VMs; and the rule that a mapping never goes while a
KVM slot points at it."""

from __future__ import annotations

import copy
import gc
import io
import mmap
import os
import pickle
import subprocess
import sys
import warnings

import pytest

from kvm_bindings import HltExit, IoExit, MmioExit, StaleHandleError, abi
from kvm_bindings.backing import PAGE_SIZE, Backing
from kvm_bindings.memory import MemoryRegion

# alias.S writes GOOD to GPA 0x21010, then reads GPA 0x30010 and reports it on port 0x3f9.
GOOD = (0x600DCAFE).to_bytes(4, "little")
WRITTEN, READ = 0x21010, 0x30010


@pytest.fixture
def own():
    """own(backing) -> backing, closed when the test ends (after or before its VM: either works)."""
    made: list[Backing] = []

    def keep(backing: Backing) -> Backing:
        made.append(backing)
        return backing
    yield keep
    for backing in made:
        backing.close()


def _alias_pair(vm, ram: Backing, base: int = 0) -> tuple[MemoryRegion, MemoryRegion]:
    """ram[base:base+0x2000] at 0x20000 and ram[base+0x1000:base+0x2000] at 0x30000: GPAs
    0x21010 and 0x30010 are the same byte, ram[base+0x1010]."""
    return (vm.add_memory(0x20000, 0x2000, backing=ram, offset=base),
            vm.add_memory(0x30000, backing=ram, offset=base + 0x1000, size=0x1000))


def _reported(vcpu) -> bytes:
    """Run to the guest's report on port 0x3f9 and then its hlt; what it reported."""
    exit = vcpu.run()
    assert isinstance(exit, IoExit) and exit.port == 0x3F9 and exit.is_write, exit
    data = bytes(exit.data)
    assert isinstance(vcpu.run(), HltExit)
    return data


def _fds_naming(fragment: str) -> int:
    count = 0
    for n in os.listdir("/proc/self/fd"):
        try:
            count += fragment in os.readlink(f"/proc/self/fd/{n}")
        except OSError:
            pass
    return count


def _maps_naming(fragment: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(fragment in line for line in f)


def _maps_of_size(size: int) -> int:
    with open("/proc/self/maps") as f:
        spans = (line.split()[0].split("-") for line in f)
        return sum(int(hi, 16) - int(lo, 16) == size for lo, hi in spans)


# ---- aliases: one backing, several GPAs, several VMs ---------------------------------------

def test_a_guest_write_through_one_gpa_is_read_back_through_an_alias(vm, real_mode, own):
    ram = own(Backing.memfd(0x2000))
    ram.view()[0x10:0x14] = b"WRNG"        # what 0x30010 would hold if the offset were ignored
    ram.view()[0x1010:0x1014] = b"OLD!"    # what it holds if the slots do not share memory
    a, b = _alias_pair(vm, ram)
    assert (a.backing, a.offset, b.backing, b.offset) == (ram, 0, ram, 0x1000)
    assert b.host_addr == ram.host_addr + 0x1000 and ram.regions == (a, b)
    assert _reported(real_mode("alias")) == GOOD
    assert vm.memory.read(READ, 4) == vm.memory.read(WRITTEN, 4) == GOOD
    vm.memory.write(0x30020, b"host")      # and the host's writes, through either GPA
    assert vm.memory.read(0x21020, 4) == b"host"


def test_another_process_maps_the_memfd_and_shares_what_the_guest_sees(vm, real_mode, own):
    ram = own(Backing.memfd(0x2000, "kvm-bindings-test-peer"))
    _alias_pair(vm, ram)
    assert _reported(real_mode("alias")) == GOOD
    peer = ("import mmap, sys\n"
            "m = mmap.mmap(int(sys.argv[1]), 0x2000)\n"
            "sys.stdout.write(m[0x1010:0x1014].hex())\n"
            "m[0x20:0x24] = b'peer'\n")
    fd = ram.fileno()
    result = subprocess.run([sys.executable, "-c", peer, str(fd)], pass_fds=[fd],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == GOOD.hex()                # the guest's write, seen by the peer
    assert vm.memory.read(0x20020, 4) == b"peer"      # the peer's write, seen by the guest's RAM


def test_one_backing_backs_slots_in_two_vms_and_outlives_one_of_them(kvm, vm, real_mode, own):
    ram = own(Backing.memfd(0x2000))
    a, b = _alias_pair(vm, ram)
    with kvm.create_vm() as other:
        theirs = other.add_memory(0x100000, backing=ram)
        other.memory.write(0x100010, b"vm#2")
        assert vm.memory.read(0x20010, 4) == b"vm#2"
        assert set(ram.regions) == {a, theirs, b}
    assert theirs.removed and ram.regions == (a, b)
    assert _reported(real_mode("alias")) == GOOD      # the first VM's slots still work
    assert ram.view()[0x10:0x14] == b"vm#2" and ram.view()[0x1010:0x1014] == GOOD


def test_without_a_backing_the_region_owns_its_memory_and_an_alias_keeps_it(vm):
    region = vm.add_memory(0x20000, 0x2000)
    mine = region.backing
    assert mine.kind == "anonymous" and region.offset == 0 and mine.size == 0x2000
    alias = vm.add_memory(0x40000, backing=mine, offset=0x1000)
    vm.memory.write(0x21000, b"kept")
    vm.remove_memory(region)                 # owned: closed, but the alias still maps it
    assert mine.closed and alias.backing is mine
    assert vm.memory.read(0x40000, 4) == b"kept"
    vm.remove_memory(alias)
    with pytest.raises(StaleHandleError):
        mine.view()


# ---- read-only toggling --------------------------------------------------------------------

def test_set_readonly_keeps_contents_and_a_guest_write_then_exits_as_mmio(vm, real_mode, own):
    ram = own(Backing.memfd(0x2000))
    a, b = _alias_pair(vm, ram)             # b: a writable alias the guest reads through
    vm.memory.write(WRITTEN, b"ROM!")
    rom = vm.set_readonly(a, True)
    assert rom is not a and a.removed and rom.slot == a.slot
    assert rom.flags & abi.KVM_MEM_READONLY and (rom.backing, rom.offset) == (ram, 0)
    assert vm.memory.region_at(WRITTEN) is rom and vm.memory.read(WRITTEN, 4) == b"ROM!"
    with pytest.raises(StaleHandleError):
        vm.remove_memory(a)
    vcpu = real_mode("alias")
    exit = vcpu.run()
    assert isinstance(exit, MmioExit) and exit.is_write, exit
    assert (exit.phys_addr, bytes(exit.data)) == (WRITTEN, GOOD)
    assert _reported(vcpu) == b"ROM!"        # the write did not land; the contents stayed
    assert vm.set_readonly(rom, True) is rom             # already so: nothing to do
    ram_again = vm.set_readonly(rom, False)
    assert not ram_again.flags & abi.KVM_MEM_READONLY and vm.memory.read(WRITTEN, 4) == b"ROM!"
    again = real_mode("alias", vcpu_id=1)
    assert _reported(again) == GOOD           # writable once more: the guest's write lands


# ---- files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [True, False], ids=["shared", "private"])
@pytest.mark.parametrize("given", ["path", "fd"])
def test_a_shared_file_slot_writes_the_file_and_a_private_one_does_not(vm, real_mode, own,
                                                                      tmp_path, shared, given):
    path = tmp_path / "guest-ram"
    path.write_bytes(b"F" * 0x3000)
    with open(path, "r+b") as f:
        source = path if given == "path" else f.fileno()
        ram = own(Backing.file(source, offset=0x1000, shared=shared))
    assert (ram.size, ram.file_offset) == (0x2000, 0x1000)
    _alias_pair(vm, ram)
    assert _reported(real_mode("alias")) == GOOD      # one mapping: the alias sees the write
    on_disk = path.read_bytes()
    assert on_disk[0x2010:0x2014] == (GOOD if shared else b"FFFF")
    assert on_disk.count(b"F") == 0x3000 - 4 * shared   # nothing else was touched


# ---- a caller's buffer ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mmap", "bytearray"])
def test_a_callers_buffer_backs_guest_memory_both_ways(vm, real_mode, kind):
    buffer = mmap.mmap(-1, 0x3000) if kind == "mmap" else bytearray(0x4000)
    ram = Backing.from_buffer(buffer)
    base = ram.page_offset                  # a bytearray rarely starts on a page
    assert (ram.host_addr + base) % PAGE_SIZE == 0
    a = vm.add_memory(0x20000, 0x2000, backing=ram, offset=base)
    b = vm.add_memory(0x30000, 0x1000, backing=ram, offset=base + 0x2000)
    buffer[base + 0x2010:base + 0x2014] = b"host"          # straight into the caller's buffer
    assert _reported(real_mode("alias")) == b"host"        # ...seen by the guest
    assert buffer[base + 0x1010:base + 0x1014] == GOOD       # and the guest's write, by the caller
    with pytest.raises(BufferError):        # the caller cannot pull it from under KVM...
        buffer.close() if isinstance(buffer, mmap.mmap) else buffer.extend(b"x")
    vm.remove_memory(a)
    vm.remove_memory(b)
    ram.close()                             # ...until the backing lets go; we never unmapped it
    assert buffer[base + 0x1010:base + 0x1014] == GOOD
    buffer.close() if isinstance(buffer, mmap.mmap) else buffer.extend(b"x")


# ---- hugepages -----------------------------------------------------------------------------

def _meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)}


def _nr_overcommit() -> int:
    with open("/proc/sys/vm/nr_overcommit_hugepages") as f:
        return int(f.read())


def _kernel_page_size(address: int) -> int:
    """The page size the kernel maps the mapping starting at address with (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        lines = iter(f)
        for line in lines:
            if line.startswith(f"{address:x}-"):
                break
        for line in lines:
            if line.startswith("KernelPageSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping starts at {address:#x}")


@pytest.mark.parametrize("how", ["hugepages", "memfd"])
def test_hugepages_back_guest_memory_where_the_host_has_them_else_say_why(vm, real_mode, how):
    info = _meminfo()
    page = info["Hugepagesize"] * 1024
    free = info["HugePages_Free"] - info["HugePages_Rsvd"]
    make = {"hugepages": lambda: Backing.hugepages(page),
            "memfd": lambda: Backing.memfd(page, hugepages=True)}[how]
    name = f"{page >> 30} GiB" if page >= 1 << 30 else f"{page >> 20} MiB"
    if free < 1 and info["HugePages_Total"] == 0 and _nr_overcommit() == 0:
        with pytest.raises(OSError, match=f"no free {name} hugepages: "
                                          f"/proc/sys/vm/nr_hugepages is 0"):
            make()
        return
    try:
        ram = make()
    except OSError as e:
        assert free < 1, f"{free} hugepages were free: {e}"   # overcommit may fail
        assert "hugepages" in str(e)
        return
    with ram:
        _alias_pair(vm, ram)
        assert _reported(real_mode("alias")) == GOOD
        assert _kernel_page_size(ram.host_addr) == page, "not mapped with hugepages"
        vm.remove_memory(vm.memory.region_at(0x20000))
        vm.remove_memory(vm.memory.region_at(0x30000))


# ---- misuse ----------------------------------------------------------------------------------

@pytest.fixture
def slot_calls(vm, monkeypatch):
    """Every KVM_SET_USER_MEMORY_REGION(2) the VM issues, as (slot, size)."""
    calls: list[tuple[int, int | None]] = []
    real = type(vm)._set_region

    def spy(self, region, size=None, **kw):
        calls.append((region.slot, size))
        return real(self, region, size=size, **kw)
    monkeypatch.setattr(type(vm), "_set_region", spy)
    return calls


@pytest.mark.parametrize("kwargs, error, match", [
    ({"backing": "memfd"}, TypeError, "backing must be a Backing"),
    ({"backing": True, "offset": "0"}, TypeError, "offset must be an integer"),
    ({"backing": True, "offset": 0x800}, ValueError, "not on a page boundary"),
    ({"backing": True, "offset": 0x3000}, ValueError, r"offset 0x3000 is outside"),
    ({"backing": True, "offset": -0x1000}, ValueError, "is outside"),
    ({"backing": True, "size": 0x4000}, ValueError, "runs past the end"),
    ({"backing": True, "offset": 0x1000, "size": 0x3000}, ValueError, "runs past the end"),
    ({"backing": True, "size": 0x800}, ValueError, "multiple of the page size"),
    ({"backing": True, "size": 1.0}, TypeError, "size must be an integer"),
    ({"offset": 0x1000, "size": 0x1000}, ValueError, "needs a backing"),
    ({}, TypeError, "needs a size"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(v))
def test_bad_backing_arguments_are_refused_before_any_ioctl(vm, own, slot_calls, kwargs, error,
                                                            match):
    ram = own(Backing.memfd(0x3000))
    if kwargs.get("backing") is True:
        kwargs = {**kwargs, "backing": ram}
    before = vm.memory.regions
    with pytest.raises(error, match=match):
        vm.add_memory(0x100000, **kwargs)
    assert slot_calls == [] and vm.memory.regions == before and ram.regions == ()


def test_bad_constructor_arguments_are_refused(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 0x2000)
    (tmp_path / "empty").write_bytes(b"")
    cases = [
        (lambda: Backing.anonymous("1"), TypeError, "size must be an integer"),
        (lambda: Backing.anonymous(0), ValueError, "size must be positive"),
        (lambda: Backing.memfd(-1), ValueError, "size must be positive"),
        (lambda: Backing.memfd(0x1000, page_size=2 << 20), ValueError, "hugepages=True"),
        (lambda: Backing.hugepages(0x1000, page_size=0x1000), ValueError, "no 4 KiB hugepages"),
        (lambda: Backing.file(1.5), TypeError, "a path or an fd"),
        (lambda: Backing.file(True), TypeError, "a path or an fd"),
        (lambda: Backing.file(path, offset=0x800), ValueError, "multiple of the page size"),
        (lambda: Backing.file(path, size=0x3000), ValueError, "SIGBUS"),
        (lambda: Backing.file(path, offset=0x2000), ValueError, "at or past the end"),
        (lambda: Backing.file(tmp_path / "empty"), ValueError, "at or past the end"),
        (lambda: Backing.file(tmp_path / "missing"), FileNotFoundError, "missing"),
        (lambda: Backing.from_buffer(b"bytes"), TypeError, "bytes is read-only"),
        (lambda: Backing.from_buffer(3), TypeError, "not int"),
        (lambda: Backing.from_buffer(memoryview(bytearray(64))[::2]), TypeError, "contiguous"),
        (lambda: Backing.from_buffer(bytearray()), ValueError, "at least one byte"),
    ]
    fds = len(os.listdir("/proc/self/fd"))
    for make, error, match in cases:
        with pytest.raises(error, match=match):
            make()
    assert len(os.listdir("/proc/self/fd")) == fds          # no failed constructor kept an fd
    with open(path, "rb") as readonly:
        with pytest.raises(PermissionError, match="open for reading and writing"):
            Backing.file(readonly.fileno())                 # shared needs a writable fd
        with Backing.file(readonly.fileno(), shared=False) as private:   # private does not
            assert private.view()[:1] == b"x"


def test_a_closed_backing_is_refused_everywhere(vm, slot_calls):
    ram = Backing.memfd(0x1000)
    ram.close()
    ram.close()                                             # closing twice is fine
    for call in (lambda: vm.add_memory(0x100000, backing=ram), ram.view, ram.fileno,
                 ram.__enter__):
        with pytest.raises(StaleHandleError, match="closed"):
            call()
    assert slot_calls == []
    with Backing.anonymous(0x1000) as anon, pytest.raises(io.UnsupportedOperation):
        anon.fileno()                                       # no fd to give


def test_closing_a_backing_in_use_defers_the_unmap_to_the_last_slot(vm, monkeypatch):
    name = "kvm-bindings-test-deferred"
    ram = Backing.memfd(0x2000, name)
    a, b = _alias_pair(vm, ram)
    events = _record(monkeypatch, vm)
    fds = _fds_naming(name)
    ram.close()                              # returns: deferred, not refused
    assert ram.closed and ram.regions == (a, b) and "2 slot(s) still using it" in repr(ram)
    assert _fds_naming(name) == fds - 1      # its own fd is closed at once...
    assert _maps_naming(name) == 1 and events == []      # ...the mapping is not
    vm.memory.write(WRITTEN, b"live")        # the slots still work, both of them
    assert vm.memory.read(READ, 4) == b"live"
    with pytest.raises(StaleHandleError):
        vm.add_memory(0x100000, backing=ram)     # but nothing new may use it
    vm.remove_memory(a)
    assert events == [("delete", a.slot)] and vm.memory.read(READ, 4) == b"live"
    vm.remove_memory(b)                      # the last one: now it goes
    assert events == [("delete", a.slot), ("delete", b.slot), ("unmap", "memfd")]
    assert _maps_naming(name) == 0 and _fds_naming(name) == 0


def test_a_backing_closed_while_add_memory_checks_it_gets_no_slot(vm, monkeypatch, slot_calls):
    ram = Backing.memfd(0x1000)
    span = Backing._span

    def span_then_close(self, offset, size):
        checked = span(self, offset, size)
        self.close()                         # as if another thread closed it just now
        return checked
    monkeypatch.setattr(Backing, "_span", span_then_close)
    with pytest.raises(StaleHandleError, match="closed"):
        vm.add_memory(0x100000, backing=ram)
    assert slot_calls == [] and ram.regions == () and vm.memory.region_at(0x100000) is None


def _record(monkeypatch, vm) -> list[tuple[str, object]]:
    """In order: slots KVM deleted ("delete", slot) and mappings gone ("unmap", backing kind)."""
    events: list[tuple[str, object]] = []
    set_region, unmap = type(vm)._set_region, Backing._unmap

    def spy_set(self, region, size=None, **kw):
        if size == 0:
            events.append(("delete", region.slot))
        return set_region(self, region, size=size, **kw)

    def spy_unmap(self):
        if self._buffer is not None:
            events.append(("unmap", self.kind))
        return unmap(self)
    monkeypatch.setattr(type(vm), "_set_region", spy_set)
    monkeypatch.setattr(Backing, "_unmap", spy_unmap)
    return events


def test_slots_are_deleted_before_any_unmap_and_a_callers_backing_is_never_unmapped(
        kvm, monkeypatch):
    vm = kvm.create_vm()
    events = _record(monkeypatch, vm)
    ram, kept = Backing.memfd(0x2000), Backing.memfd(0x1000)
    mine = vm.add_memory(0, 0x1000)                 # anonymous, the VM's own
    a, b = vm.add_memory(0x10000, backing=ram), vm.add_memory(0x20000, backing=ram, size=0x1000)
    vm.add_memory(0x30000, backing=kept)
    kept.view()[:4] = b"kept"
    vm.remove_memory(a)
    ram.close()                                     # deferred: b still uses it
    ro = vm.set_readonly(b, True)                   # delete + add: the backing stays mapped
    mine = vm.set_readonly(mine, True)              # the VM's own memory too
    assert events == [("delete", a.slot), ("delete", b.slot), ("delete", mine.slot)]
    vm.close()
    deleted = [e for e in events[3:] if e[0] == "delete"]
    assert sorted(deleted) == [("delete", s) for s in sorted((mine.slot, ro.slot, 3))]
    assert events.count(("unmap", "anonymous")) == events.count(("unmap", "memfd")) == 1
    assert events.index(("unmap", "anonymous")) > events.index(("delete", mine.slot))
    assert events.index(("unmap", "memfd")) > events.index(("delete", ro.slot))
    assert kept.regions == () and bytes(kept.view()[:4]) == b"kept"   # not ours: still mapped
    kept.close()
    assert events[-1] == ("unmap", "memfd") and events.count(("unmap", "memfd")) == 2


def test_a_leaked_vm_and_backing_are_torn_down_slots_first(kvm, monkeypatch):
    vm = kvm.create_vm()
    events = _record(monkeypatch, vm)
    ram = Backing.memfd(0x2000)
    slots = [vm.add_memory(0, backing=ram).slot, vm.add_memory(0x100000, backing=ram).slot]
    cycle: list[object] = [ram, vm]       # garbage together: finalized in no set order
    cycle.append(cycle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del vm, ram, cycle
        gc.collect()
    assert sorted(events[:2]) == [("delete", s) for s in sorted(slots)]
    assert events[2:] == [("unmap", "memfd")]


@pytest.mark.parametrize("first", ["vm", "backings"])
def test_nothing_leaks_once_the_vm_and_its_backings_are_closed(kvm, tmp_path, first):
    name, path = "kvm-bindings-test-leak", tmp_path / "leak-ram"
    path.write_bytes(bytes(0x3000))
    fds = len(os.listdir("/proc/self/fd"))
    vm = kvm.create_vm()
    caller = mmap.mmap(-1, 0x2000)
    backings = [Backing.memfd(0x2000, name), Backing.file(path), Backing.anonymous(0x2000),
                Backing.from_buffer(caller)]
    # Anonymous memory has no name in /proc/self/maps and may merge with its neighbours there:
    # the mmap object says whether it was unmapped.
    anonymous = backings[2]._mmap
    for i, ram in enumerate(backings):
        vm.add_memory(i << 24, backing=ram, size=0x1000)
        vm.add_memory((i << 24) + 0x100000, backing=ram, size=0x1000)
    owned = vm.add_memory(0x10000000, 0x1000).backing._mmap
    assert _maps_naming(name) == _maps_naming(str(path)) == 1
    try:
        for close in ([vm.close, *(b.close for b in backings)] if first == "vm"
                      else [*(b.close for b in backings), vm.close]):
            close()
        assert _maps_naming(name) == _maps_naming(str(path)) == 0
        assert anonymous is not None and anonymous.closed and owned is not None and owned.closed
        assert not caller.closed                   # the caller's mapping is the caller's
    finally:
        vm.close()
        for ram in backings:
            ram.close()
        caller.close()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_backings_cannot_be_copied_or_pickled():
    with Backing.memfd(0x1000) as ram:
        for clone in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot be"):
                clone(ram)


def test_an_unclosed_backing_warns_and_is_closed_when_collected():
    name = "kvm-bindings-test-unclosed"
    ram = Backing.memfd(0x1000, name)
    with pytest.warns(ResourceWarning, match="unclosed <Backing memfd"):
        del ram
        gc.collect()
    assert _fds_naming(name) == _maps_naming(name) == 0


def test_a_memfd_backing_cannot_be_shrunk_under_the_guest(vm):
    # Whoever holds fileno() (another process) could truncate it, and the next host read of
    # a page cut off was SIGBUS: an interpreter crash (found by an adversarial pass).
    with Backing.memfd(0x10000) as backing:
        vm.add_memory(0x400000, backing=backing)
        vm.memory.write(0x40F000, b"kept")
        with pytest.raises(PermissionError):
            os.ftruncate(backing.fileno(), 0)
        os.ftruncate(backing.fileno(), 0x20000)          # growing is harmless, and allowed
        assert vm.memory.read(0x40F000, 4) == b"kept"
        vm.close()


def test_sizes_no_mapping_can_have_are_said_plainly():
    with pytest.raises(OverflowError, match="more than a mapping can be"):
        Backing.anonymous(1 << 63)
    with pytest.raises(ValueError, match="hugepages"):       # not a whole number of KiB
        Backing.hugepages(2 << 20, page_size=(2 << 20) + 512)
    with pytest.raises(TypeError, match="not bool"):
        Backing.memfd(True)
