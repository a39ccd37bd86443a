"""Suite-wide settings that must precede every import of the code under test.

The suite runs on CPU. Triton picks its interpreter when ``triton`` is first imported (the standard
library of ``triton.language`` is decorated then), and several modules import triton indirectly
(``torch._dynamo`` through the trainer), so the choice cannot wait for ``test_kernels.py``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
