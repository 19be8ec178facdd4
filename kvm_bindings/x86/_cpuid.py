"""kvm_cpuid2 answers of unknown length, which three x86 calls read: KVM_GET_SUPPORTED_CPUID
and KVM_GET_EMULATED_CPUID on /dev/kvm, KVM_GET_SUPPORTED_HV_CPUID and KVM_GET_CPUID2."""

from __future__ import annotations

import errno
from collections.abc import Callable

from ..abi import x86_64 as abi
from ..errors import KvmError


def grown(ask: Callable[[abi.kvm_cpuid2], object], start: int, limit: int,
          factor: int = 2) -> abi.kvm_cpuid2:
    """ask(cpuid) with room for start entries, then factor times more each time the kernel
    says E2BIG (the buffer was too small; it does not say how big to go), up to limit."""
    n = start
    while True:
        cpuid = abi.kvm_cpuid2.alloc(n)
        try:
            ask(cpuid)
            return cpuid
        except KvmError as e:
            if e.errno != errno.E2BIG or n >= limit:
                raise
            n *= factor
