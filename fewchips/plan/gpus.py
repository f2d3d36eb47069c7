"""Known accelerators: memory, dense tensor-core peaks and interconnect, from vendor datasheets.

Peaks are *dense* (no 2:4 sparsity): NVIDIA's datasheets print the sparse figure with a footnote, so
the dense figure is half of it. Memory is the vendor's capacity, read as GiB (HBM stacks are
binary-sized; an "80GB" H100 shows 81,559 MiB in nvidia-smi). Interconnect is the vendor's
per-GPU aggregate bidirectional scale-up bandwidth (NVLink, Infinity Fabric, or PCIe where a card
has no NVLink); scale-out networks (InfiniBand) are not in the table.

`--gpu-spec mem=192,bf16=1307,fp8=2615,link=896` describes any other accelerator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float          # capacity
    bf16_tflops: float         # dense BF16 tensor-core peak
    fp8_tflops: float | None   # dense FP8 tensor-core peak; None: no FP8 tensor cores
    link_gbps: float           # scale-up interconnect, GB/s, aggregate bidirectional
    hbm_tbps: float | None = None   # memory bandwidth, TB/s

    def peak_tflops(self, fp8: bool) -> float:
        """The dense peak matmuls run at: FP8 where asked and supported, else BF16."""
        return self.fp8_tflops if fp8 and self.fp8_tflops else self.bf16_tflops


GPUS: dict[str, GPU] = {g.name: g for g in [
    # NVIDIA H800 SXM5 datasheet ("NVIDIA H800 Tensor Core GPU"): 80GB HBM3, 3.35TB/s; BF16 1,979 and
    # FP8 3,958 TFLOPS with sparsity; NVLink 400GB/s. The H100's compute with NVLink cut from 900 to
    # 400GB/s; the GPU DeepSeek-V3 was trained on (report section 3.1).
    GPU("h800", 80, 989.4, 1978.9, 400, 3.35),
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: 80GB, 3.35TB/s; BF16 1,979 / FP8 3,958 TFLOPS
    # with sparsity (dense 989.4 / 1,978.9 in the Hopper architecture whitepaper); NVLink 900GB/s.
    GPU("h100", 80, 989.4, 1978.9, 900, 3.35),
    # Same datasheet, PCIe column: 80GB, 2TB/s; BF16 1,513 / FP8 3,026 with sparsity; NVLink bridge 600GB/s.
    GPU("h100-pcie", 80, 756.5, 1513.0, 600, 2.0),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: 141GB HBM3e, 4.8TB/s; BF16 1,979 / FP8 3,958
    # TFLOPS with sparsity; NVLink 900GB/s.
    GPU("h200", 141, 989.4, 1978.9, 900, 4.8),
    # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: 80GB HBM2e, 2,039GB/s; BF16 312 TFLOPS
    # dense (624 with sparsity); no FP8; NVLink 600GB/s.
    GPU("a100", 80, 312.0, None, 600, 2.039),
    # Same datasheet, 40GB SXM column (1,555GB/s).
    GPU("a100-40g", 40, 312.0, None, 600, 1.555),
    # NVIDIA HGX B200 specifications (nvidia.com/en-us/data-center/hgx, per-GPU rows): 180GB HBM3e,
    # 7.7TB/s; FP16/BF16 4.5 PFLOPS and FP8 9 PFLOPS with sparsity; 5th-generation NVLink 1.8TB/s.
    GPU("b200", 180, 2250.0, 4500.0, 1800, 7.7),
    # NVIDIA Ada Lovelace architecture whitepaper, appendix table for GeForce RTX 4090: 24GB GDDR6X,
    # 1,008GB/s; BF16 (FP32 accumulate) 165.2 TFLOPS dense; FP8 (FP32 accumulate) 330.3 dense.
    # No NVLink: PCIe 4.0 x16, 64GB/s bidirectional.
    GPU("rtx4090", 24, 165.2, 330.3, 64, 1.008),
    # AMD Instinct MI300X data sheet: 192GB HBM3, 5.3TB/s; BF16 1,307.4 and FP8 2,614.9 TFLOPS dense;
    # Infinity Fabric 896GB/s peak aggregate.
    GPU("mi300x", 192, 1307.4, 2614.9, 896, 5.3),
]}

_ALIASES = {"4090": "rtx4090", "rtx-4090": "rtx4090", "h100-sxm": "h100", "h200-sxm": "h200",
            "a100-80g": "a100", "h800-sxm": "h800"}

_SPEC_KEYS = {"mem": "memory_gib", "bf16": "bf16_tflops", "fp8": "fp8_tflops", "link": "link_gbps",
              "hbm": "hbm_tbps", "name": "name"}


def get_gpu(name: str) -> GPU:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} "
                         f"(describe another with --gpu-spec mem=GiB,bf16=TFLOPS[,fp8=TFLOPS,link=GB/s])")
    return GPUS[key]


def parse_gpu_spec(spec: str, base: GPU | None = None) -> GPU:
    """`mem=192,bf16=1307,fp8=2615,link=896[,hbm=5.3][,name=mi300x]`; mem and bf16 are required
    unless a base GPU (from --gpu) supplies them, in which case the given keys override it."""
    fields: dict = dataclasses.asdict(base) if base else {"name": "custom", "fp8_tflops": None,
                                                           "link_gbps": 0.0, "hbm_tbps": None}
    if base:
        fields["name"] = base.name + "*"
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in _SPEC_KEYS:
            raise ValueError(f"--gpu-spec: bad item {item!r}; expected key=value with key one of "
                             f"{', '.join(_SPEC_KEYS)}")
        if key == "name":
            fields["name"] = value.strip()
            continue
        try:
            x = float(value.lower().removesuffix("gib").removesuffix("gb").removesuffix("tflops"))
        except ValueError:
            raise ValueError(f"--gpu-spec: {key}={value!r} is not a number") from None
        if not (x > 0 and x < float("inf")):
            raise ValueError(f"--gpu-spec: {key} must be a positive number, got {value!r}")
        fields[_SPEC_KEYS[key]] = x
    missing = [k for k in ("memory_gib", "bf16_tflops") if k not in fields]
    if missing:
        need = {"memory_gib": "mem", "bf16_tflops": "bf16"}
        raise ValueError(f"--gpu-spec: missing {', '.join(need[k] for k in missing)} "
                         f"(e.g. --gpu-spec mem=192,bf16=1307,fp8=2615,link=896)")
    return GPU(**fields)
