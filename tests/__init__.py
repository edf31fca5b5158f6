"""Tests mirror the package: tests/<package>/test_<module>.py holds the tests of alignment/<package>/<module>.py
(tests/kernels/ those of kernels/, tests/test_<module>.py those of a top-level module)."""
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
