"""Performance-critical ops. Each op lives in `kernels/<op>/` split the same way:

  reference.py   plain jnp, the oracle (materialises everything, float32 math)
  xla.py         blockwise pure JAX with a custom VJP; runs on every backend, the CPU default
  pallas_gpu.py  Pallas kernels with the Triton lowering
  pallas_tpu.py  Pallas kernels with the Mosaic (TPU) lowering
  api.py         picks an implementation by backend, with an explicit override and a logged fallback

dispatch.py holds that choice (and `target_platform`, which picks a TPU or GPU's kernels on a CPU host);
lowering.py lowers programs for TPU (Mosaic) and GPU (Triton) there and checks the kernels' VMEM and tile
budgets (tests/test_kernels_lowering*.py). Running them on a device: benchmarks/device_check.py.
"""
