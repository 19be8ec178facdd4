"""Sphinx configuration for the kvm-bindings docs.

Build:  python -m sphinx -W --keep-going -b html docs docs/_build/html
The reference and ABI pages are written at build time by _ext/kvm_docs.py from the
package itself, so they cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Document the checkout this conf.py belongs to, not whatever kvm_bindings is installed.
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "_ext"))

project = "kvm-bindings"
author = "the kvm-bindings authors"
copyright = "the kvm-bindings authors"

extensions = ["sphinx.ext.autodoc", "kvm_docs"]

exclude_patterns = ["_build"]
root_doc = "index"
html_theme = "alabaster"
html_title = "kvm-bindings"

# Docstrings are plain text: render them as written, never guess roles.
default_role = "literal"
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = True
add_module_names = True

# The modules the reference documents besides kvm_bindings itself (one page each,
# reference/<last part>.rst). tests/test_docs.py checks what the built inventory holds.
kvm_docs_modules = [
    "kvm_bindings.x86",
    "kvm_bindings.memory",
    "kvm_bindings.exits",
    "kvm_bindings.errors",
    "kvm_bindings.stats",
    "kvm_bindings.device",
    "kvm_bindings.conformance",
    "kvm_bindings.testing",
]
# Arch packages: their classes extend kvm_bindings.Kvm/Vm/Vcpu and list only what they add.
kvm_docs_arch_modules = ["kvm_bindings.x86"]

# A builtin in an annotation (`type[...]`) is looked up as a name anywhere in the docs, and
# several exits and StatDescriptor have a field called `type`: Sphinx then warns "more than
# one target found" and links to none. That is not a fault in the docs, so it is not an error.
suppress_warnings = ["ref.python"]
