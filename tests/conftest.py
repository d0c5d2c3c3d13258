import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which is chosen when the
# kernels are defined: before any test imports pipebd.kernels, and inherited by worker processes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    # The machines running the suite have two cores; multi-process tests start up to four ranks.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _profile_cache(tmp_path_factory, monkeypatch):
    # Profiles measured by one test must not leak into another (or into ~/.cache).
    monkeypatch.setenv("PIPEBD_CACHE_DIR", str(tmp_path_factory.mktemp("profiles")))
