"""Tests mirror the package: tests/<package>/test_<module>.py holds the tests of alignment/<package>/<module>.py
(tests/kernels/ those of kernels/, tests/test_<module>.py those of a top-level module)."""
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def persistent_compilation_cache(directory: str):
    """A generator for a pytest fixture: JAX's persistent compilation cache in `directory` while it runs, so runs
    that compile the same programs (restarts, repeated stages) load them instead of compiling again."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cc.reset_cache()  # the cache is otherwise set up once per process, by the first compilation
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    cc.reset_cache()
