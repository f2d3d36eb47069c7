"""Checkpoint I/O, one package: the Hugging Face format on disk (`hf_format`: names, the streamed
safetensors writer), reading it into a model (`load`: `from_pretrained`, `CheckpointReader`), FP8
block-scaled checkpoints (`fp8`: `save_fp8`, `load_fp8`, `convert`), sharded torch.distributed
checkpoints of a parallel run (`sharded`) and a training run's folder (`run_dir`: resume, state).

Its modules sit at different layers (tests/test_layers.py): `hf_format` at the floor beside `config`,
`load` above the model, `fp8` and `sharded` beside the FP8 recipe and parallelism, `run_dir` beside
the trainer. The names below load on first use, so importing one module never pulls in the others.
"""

from ..lazy import lazy_attributes

_LAZY = {**{n: "load" for n in ("CheckpointError", "CheckpointReader", "Entry", "Fill", "copy_checked", "empty_model",
                                "expert_disk_name", "from_pretrained", "load_weights", "row_runs", "weight_files")},
         **{n: "hf_format" for n in ("EXPERT_LOADS_FILE", "FP8_DTYPES", "INDEX_FILE", "SINGLE_FILE", "disk_name",
                                     "hf_state_dict", "moe_expert_names", "save_pretrained", "stream_safetensors",
                                     "write_expert_loads", "write_index", "write_safetensors", "write_shards")},
         **{n: "fp8" for n in ("convert", "load_fp8", "save_fp8")}}

__all__ = sorted(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
