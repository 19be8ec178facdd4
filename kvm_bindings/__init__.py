"""kvm-bindings: the Linux KVM API for Python, generated from the kernel's headers."""
