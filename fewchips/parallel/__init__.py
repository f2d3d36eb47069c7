"""Scale-out on torch.distributed: a dp x ep device mesh, expert parallelism with all-to-all,
FSDP2 for everything else, sharded checkpoints. The model knows nothing of this package: it is
applied to a built model (`parallelize`) by the trainer."""

from .mesh import Parallel, abort_on_failure, init_parallel, shutdown
from .expert_parallel import ExpertParallelExperts, apply_expert_parallel, reduce_expert_grads
from .fsdp import apply_fsdp
from .step import clip_grad_norm_, global_expert_loads, lm_loss, parallelize, train_step, update_biases

__all__ = ["Parallel", "init_parallel", "shutdown", "abort_on_failure", "ExpertParallelExperts",
           "apply_expert_parallel", "reduce_expert_grads", "apply_fsdp", "parallelize", "lm_loss",
           "train_step", "global_expert_loads", "update_biases", "clip_grad_norm_"]
