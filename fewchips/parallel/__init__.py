"""Scale-out on torch.distributed: a pp x dp x ep device mesh, pipeline stages, expert parallelism with
all-to-all, FSDP2 for everything else, sharded checkpoints. The model knows nothing of this package:
the trainer applies it to a built model (`parallelize`, `parallel.pipeline.Pipeline`)."""

from .mesh import Parallel, abort_on_failure, init_parallel, shutdown
from .expert_parallel import ExpertParallelExperts, apply_expert_parallel
from .fsdp import apply_fsdp
from .placement import grad_norm_sq, parallelize

__all__ = ["Parallel", "init_parallel", "shutdown", "abort_on_failure", "ExpertParallelExperts",
           "apply_expert_parallel", "apply_fsdp", "parallelize", "grad_norm_sq"]
