"""Test-session set-up shared by every test file."""
import os
import tempfile

import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. Triton reads this
# when a kernel is decorated, so it must be set before anything imports incubation.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The dispatcher's measured decisions go to a fresh folder: tests neither read a developer's
# cache nor leave one behind.
os.environ.setdefault("INCUBATION_CACHE_DIR", tempfile.mkdtemp(prefix="incubation-test-cache-"))
