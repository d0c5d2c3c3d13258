"""The CUDA paths of the engine on one GPU (marked gpu; skipped without CUDA): the relay,
checkpoints and codistillation on a GPU give the CPU's results. Kernels: tests/test_kernels.py.
Run them with ``pytest -m gpu`` on a machine with a GPU (bench/gpu_session.sh does)."""

import pytest
import torch
from torch import nn

import pipebd
from pipebd.models import mlp_pair

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DATA = torch.randn(60, 16, generator=torch.Generator().manual_seed(1))


def distiller(device):
    teacher, student = mlp_pair(num_blocks=4, seed=0)
    return pipebd.Distiller(teacher, student, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                            scheduler=lambda o: pipebd.lr.warmup(o, 3), device=device)


def max_diff(a, b):
    a, b = a.student_model().state_dict(), b.student_model().state_dict()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(autouse=True)
def _no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("strategy", ["pipebd", "baseline"])
def test_fit_on_cuda_matches_cpu(strategy):
    cpu, gpu = distiller("cpu"), distiller("cuda")
    cpu.fit(DATA, 7, 20, strategy=strategy, progress=False)
    report = gpu.fit(DATA, 7, 20, strategy=strategy, progress=False)
    assert max_diff(cpu, gpu) < 1e-4
    assert all(0.0 < u <= 1.0 for u in report.stage_utilization)


def test_checkpoint_on_cuda_resumes_to_the_uninterrupted_weights(tmp_path):
    whole = distiller("cuda")
    whole.fit(DATA, 7, 20, progress=False)
    distiller("cuda").fit(DATA, 7, 10, checkpoint_dir=tmp_path, progress=False)
    resumed = distiller("cuda")
    resumed.fit(DATA, 7, 20, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert max_diff(whole, resumed) < 1e-6


@pytest.mark.parametrize("mode", ["codistill", "online"])
def test_codistillation_on_cuda_matches_cpu(mode):
    x, y = torch.randn(96, 8), torch.randint(0, 5, (96,))
    results = []
    for device in ("cpu", "cuda"):
        co = pipebd.Codistillation(lambda i: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)),
                                   optimizer=lambda p: torch.optim.SGD(p, lr=0.1), exchange_every=4,
                                   mode=mode, device=device)
        results.append(co.fit(torch.utils.data.TensorDataset(x, y), batch_size=12, steps=16, progress=False))
    for a, b in zip(results[0].losses, results[1].losses):
        assert max(abs(u - v) for u, v in zip(a, b)) < 1e-4


def test_dropout_on_cuda_resumes_to_the_uninterrupted_weights_and_keeps_the_callers_rng_state(tmp_path):
    def dropout_distiller():
        teacher, student = mlp_pair(num_blocks=4, seed=0)
        student = [nn.Sequential(block, nn.Dropout(0.3)) for block in student]
        return pipebd.Distiller(teacher, student, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), device="cuda")

    torch.cuda.manual_seed(11)
    before = torch.cuda.get_rng_state()
    whole = dropout_distiller()
    whole.fit(DATA, 7, 20, progress=False)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    dropout_distiller().fit(DATA, 7, 10, checkpoint_dir=tmp_path, progress=False)
    resumed = dropout_distiller()
    resumed.fit(DATA, 7, 20, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert max_diff(whole, resumed) < 1e-6


def test_one_gpu_profiles_blocks_for_four_ranks():
    # bench/gpu_profile.py: one device stands in for every rank, no communication measured.
    profile = distiller("cuda").profile(DATA, 16, 4, warmup=1, repeats=2, comm=False)
    assert profile.rows == [4, 6, 8, 16] and profile.p2p == [] and profile.allreduce == []
    assert all(t > 0 for block in profile.teacher + profile.student for t in block)


def test_cuda_tensors_go_to_spawned_ranks_as_cpu_tensors():
    # Unpickled with their device, every rank put the caller's CUDA modules and data on GPU 0.
    import cloudpickle
    from pipebd.runtime.launch import _dumps
    net, x = nn.Linear(4, 3).cuda(), torch.randn(5, 4, device="cuda")
    got_net, got_x = cloudpickle.loads(_dumps((net, x)))
    assert got_net.weight.device.type == got_x.device.type == "cpu"
    assert torch.equal(got_x, x.cpu()) and torch.equal(got_net.weight, net.weight.cpu())


class WeightedMSE(nn.Module):
    """MSE times a weight held as a buffer, as a class weight would be (1-d: a 0-d CPU tensor
    would combine with CUDA ones)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.full((1,), 1.5))

    def forward(self, s, t):
        return ((s - t) ** 2 * self.weight).mean()


def test_a_loss_module_goes_to_the_fits_device_and_comes_back():
    # Spawned ranks get the caller's tensors on the CPU, so each rank moves loss modules to its
    # device itself; at world size 1 the caller's module goes there and back, as the blocks do.
    teacher, student = mlp_pair(num_blocks=4, seed=0)
    loss = WeightedMSE()
    pipebd.Distiller(teacher, student, block_loss=loss, device="cuda").fit(DATA, 7, 3, progress=False)
    assert loss.weight.device.type == "cpu"
