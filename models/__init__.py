"""Block-split teacher/student pairs for examples, tests and benchmarks (``pipebd.models``).

Each ``*_pair`` function returns ``(teacher_blocks, student_blocks)``: two lists of plain
``nn.Module`` with matching boundary shapes, ready for ``pipebd.Distiller``. ``PAIRS`` maps a
name to the pair function and the function giving its per-sample input shape for the same
keyword arguments.
"""

from typing import Callable, NamedTuple

from .cnn import BasicBlock, InvertedResidual, cnn_input_shape, cnn_pair, mobilenet_student, resnet_teacher
from .emulated import PROFILES, EmulatedBlock, emulated_input_shape, emulated_pair
from .mlp import mlp_classifier, mlp_input_shape, mlp_pair


class PairSpec(NamedTuple):
    build: Callable
    input_shape: Callable[..., tuple[int, ...]]


PAIRS = {"mlp": PairSpec(mlp_pair, mlp_input_shape), "cnn": PairSpec(cnn_pair, cnn_input_shape),
         "emulated": PairSpec(emulated_pair, emulated_input_shape)}

__all__ = ["BasicBlock", "EmulatedBlock", "InvertedResidual", "PAIRS", "PROFILES", "PairSpec", "cnn_pair",
           "emulated_pair", "mlp_classifier", "mlp_pair", "mobilenet_student", "resnet_teacher"]
