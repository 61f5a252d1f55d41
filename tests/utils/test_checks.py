"""The config value checker: bool is not an int, an int is a float, a string is never a number, and
every message starts with the full key."""

import math

import pytest

from dllava.utils.checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_keys,
    check_str,
    check_str_list,
    check_urls,
)


def test_int_accepts_only_true_integers_in_range():
    assert check_int("a.b", 3, low=1) == 3
    assert check_int("a.b", -1, low=1, also=(-1,)) == -1
    assert check_int("a.b", None, optional=True) is None
    with pytest.raises(TypeError, match=r"^sparsity.layer must be an integer >= 1, got 2.5 \(float\)$"):
        check_int("sparsity.layer", 2.5, low=1)
    with pytest.raises(TypeError, match=r"^a.b must be an integer >= 1, got True \(bool\)$"):
        check_int("a.b", True, low=1)
    with pytest.raises(TypeError, match=r"^a.b must be an integer, got '3' \(str\)$"):
        check_int("a.b", "3")
    with pytest.raises(TypeError, match=r"^a.b must be an integer or null, got \[\] \(list\)$"):
        check_int("a.b", [], optional=True)
    with pytest.raises(TypeError, match=r"^a.b must be an integer, got None \(NoneType\)$"):
        check_int("a.b", None)
    with pytest.raises(ValueError, match=r"^trainer.max_steps must be an integer >= 1, got -1$"):
        check_int("trainer.max_steps", -1, low=1)
    with pytest.raises(ValueError, match=r"^a.b must be an integer in \[0, 4\], got 5$"):
        check_int("a.b", 5, low=0, high=4)


def test_float_takes_ints_refuses_strings_bools_and_non_finite_values():
    assert check_float("optim.lr", 1, low=0, low_open=True) == 1.0
    assert isinstance(check_float("optim.lr", 1, low=0, low_open=True), float)
    assert check_float("x", None, optional=True) is None
    with pytest.raises(TypeError, match=r"^sparsity.keep must be a number in \(0, 1\], got 'abc' \(str\)$"):
        check_float("sparsity.keep", "abc", low=0, high=1, low_open=True)
    with pytest.raises(TypeError, match=r"^x must be a number, got '1e-4' \(str\)$"):
        check_float("x", "1e-4")
    with pytest.raises(TypeError, match=r"^x must be a number, got False \(bool\)$"):
        check_float("x", False)
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^x must be a finite number"):
            check_float("x", bad)
    with pytest.raises(ValueError, match=r"^sparsity.keep must be a number in \(0, 1\], got 0$"):
        check_float("sparsity.keep", 0.0, low=0, high=1, low_open=True)
    with pytest.raises(ValueError, match=r"^optim.warmup_ratio must be a number in \[0, 1\), got 1$"):
        check_float("optim.warmup_ratio", 1, low=0, high=1, high_open=True)
    assert check_float("y", 0, low=0) == 0.0


def test_bool_means_true_or_false_only():
    assert check_bool("sparsity.vision", False) is False
    for bad in ("maybe", "true", 1, 0, None):
        with pytest.raises(TypeError, match=r"^sparsity.vision must be true or false, got "):
            check_bool("sparsity.vision", bad)
    assert check_bool("x", None, optional=True) is None


def test_strings_choices_lists_and_urls():
    assert check_str("model.name", "tiny") == "tiny"
    with pytest.raises(ValueError, match="^model.name must be a non-empty string"):
        check_str("model.name", "")
    with pytest.raises(TypeError, match=r"^model.pretrained must be a non-empty string or null, got 3 \(int\)"):
        check_str("model.pretrained", 3, optional=True)
    assert check_choice("trainer.precision", "32-true", ["32-true", 32]) == "32-true"
    with pytest.raises(ValueError, match=r"^a must be one of 1, 'x', got True \(bool\)$"):
        check_choice("a", True, [1, "x"])  # True == 1 in Python, but it is not the choice 1
    assert check_str_list("module.answer_kinds", ("a", "b")) == ["a", "b"]
    with pytest.raises(TypeError, match=r"^module.trainable must be a list of strings, e.g. \[a, b\], got 'llm'"):
        check_str_list("module.trainable", "llm")
    with pytest.raises(TypeError, match=r"^k\[1\] must be a non-empty string, got 2 \(int\)"):
        check_str_list("k", ["a", 2])
    with pytest.raises(ValueError, match=r"^k\[0\] must be one of \['a'\], got 'b'"):
        check_str_list("k", ["b"], choices=["a"])
    assert check_urls("data.train_urls", "x/*.tar") == "x/*.tar"
    assert check_urls("data.train_urls", ["a.tar"]) == ["a.tar"]
    with pytest.raises(ValueError, match="^data.val_urls must not be empty"):
        check_urls("data.val_urls", [])
    with pytest.raises(TypeError, match="^data.val_urls must be a path pattern"):
        check_urls("data.val_urls", 3)


def test_unknown_keys_are_named_with_their_prefix():
    check_keys("optim", {"lr": 1}, ["lr", "eps"])
    with pytest.raises(ValueError, match=r"^optim.lrr is not a known setting \(a typo\?\); known: eps, lr$"):
        check_keys("optim", {"lrr": 1}, ["lr", "eps"])
