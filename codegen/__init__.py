"""kvm-bindings' generator: kernel uapi headers in, ctypes modules out.

The stages are modules named after what they do and pass plain data along:
fetch -> preprocess -> parse -> model -> layout -> render, with probe as the
oracle (the C compiler) that checks the result.
"""

GENERATOR_VERSION = "0.1.0"

# What the stages import beyond the standard library; installed as the codegen extra.
REQUIRES = ("pycparser", "jinja2")
INSTALL_EXTRA = "pip install 'kvm-bindings[codegen]'"


def missing_requirements() -> list[str]:
    """The generator's dependencies that are not installed (kvm-bindings alone has none)."""
    from importlib.util import find_spec
    return [name for name in REQUIRES if find_spec(name) is None]
