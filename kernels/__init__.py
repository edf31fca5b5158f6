"""Performance-critical ops. Each op lives in `kernels/<op>/` split the same way:

  reference.py   plain jnp, the oracle (materialises everything, float32 math)
  xla.py         blockwise pure JAX with a custom VJP; runs on every backend, the CPU default
  pallas_gpu.py  Pallas kernels with the Triton lowering
  pallas_tpu.py  Pallas kernels with the Mosaic (TPU) lowering
  api.py         picks an implementation by backend, with an explicit override and a logged fallback
"""
