"""Final-answer checks on hand-computed cases: GSM8K final numbers and references, MATH symbolic equivalence."""
import pytest

from alignment.rewards import math_answers


@pytest.mark.parametrize("response,expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The answer is 1,234.", "1234"),
    ("So the answer is $18.00, which we double-check: 9 * 2 = 18.", "18"),  # first number after the marker
    ("We get \\boxed{-3.50}", "-3.5"),
    ("First 3 then 4 then 7", "7"),  # no marker: the last number
    ("no digits at all", None),
])
def test_final_number(response, expected):
    assert math_answers.final_number(response) == expected


def test_gsm8k_reference_and_match():
    assert math_answers.gsm8k_reference("Janet sells 9 eggs.\n#### 1,800") == "1800"
    assert math_answers.gsm8k_correct("The answer is 1800.", "1800")
    assert math_answers.gsm8k_correct("The answer is 1800.0", "1800")
    assert not math_answers.gsm8k_correct("The answer is 180.", "1800")
    assert not math_answers.gsm8k_correct("I don't know", "1800")
    with pytest.raises(ValueError, match="####"):
        math_answers.gsm8k_reference("no final line")


@pytest.mark.parametrize("response,reference,expected", [
    ("The answer is $\\boxed{0.5}$", "\\frac{1}{2}", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{2^{1/2}}", "\\sqrt{2}", True),
    ("\\boxed{4}", "3", False),
    ("I cannot solve this", "\\frac{1}{2}", False),
])
def test_math_equivalent(response, reference, expected):
    assert math_answers.math_equivalent(response, reference) is expected
