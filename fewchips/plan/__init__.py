"""Planning a run before spending anything: parameters, FLOPs, memory per GPU, serving capacity, time.

`gpus.py` is the accelerator table; `estimate.py` holds the arithmetic (each number with its formula).
The CLI front end is `fewchips/cli/plan.py`.
"""
