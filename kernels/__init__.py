"""Triton kernels of pipebd (imported as ``pipebd.kernels``). The fused softmax-with-temperature
kernels for the soft-target losses land here; until then ``pipebd.SoftTargetLoss`` uses its plain
torch implementation."""
