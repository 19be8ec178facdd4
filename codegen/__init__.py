"""kvm-bindings' generator: kernel uapi headers in, ctypes modules out.

The stages are modules named after what they do and pass plain data along:
fetch -> preprocess -> parse -> model -> layout -> render, with probe as the
oracle (the C compiler) that checks the result.
"""

GENERATOR_VERSION = "0.1.0"
