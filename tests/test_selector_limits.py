"""Selector caps: a selector can cost its request, never the worker's memory or its
training thread, and "did you mean" stays cheap on a model with 100,000 names.

Real objects throughout: the selector parser, a NameIndex, and a served worker over gRPC.
"""

from __future__ import annotations

import grpc
import pytest

from conftest import SEED_LRS, Served, absolute, rpc_error
from lrctl.client.errors import InvalidArgumentError, NotFoundError
from lrctl.server.selectors import (
    MAX_REPEAT_BOUND,
    MAX_REPEAT_PRODUCT,
    MAX_SELECTOR_CHARS,
    NameIndex,
    parse_selector,
)
from lrctl.v1 import lrctl_pb2 as pb

T = 10


@pytest.mark.parametrize(
    "text",
    [
        "x" * (MAX_SELECTOR_CHARS + 1),  # exact name
        "layer*" + "?" * MAX_SELECTOR_CHARS,  # glob
        "re:" + "a" * MAX_SELECTOR_CHARS,  # regex
    ],
    ids=["exact", "glob", "regex"],
)
def test_a_selector_over_the_length_limit_is_invalid(text: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_selector(text)
    message = str(info.value)
    assert str(MAX_SELECTOR_CHARS) in message and str(len(text)) in message
    assert len(message) < 500  # the selector is quoted shortened


def test_a_selector_at_the_length_limit_is_accepted() -> None:
    assert parse_selector("x" * MAX_SELECTOR_CHARS).is_exact


@pytest.mark.parametrize(
    "source, number",
    [
        ("(?:a{1000}){1000}", "1000000"),
        ("(?:(?:a{100}){100}){300}", "3000000"),
        ("a{200}b{200}", "40000"),  # siblings multiply too: stricter than needed
        ("(?:a{101,}){100}", "10100"),  # {m,} counts m
        ("(?:a{,101}){100}", "10100"),
    ],
)
def test_counted_repeats_multiplying_over_the_limit_are_invalid(source: str, number: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_selector("re:" + source)
    message = str(info.value)
    assert f"multiply to {number}" in message and str(MAX_REPEAT_PRODUCT) in message
    assert source in message


def test_one_counted_repeat_over_its_bound_is_invalid() -> None:
    with pytest.raises(InvalidArgumentError, match=f"at most {MAX_REPEAT_BOUND}"):
        parse_selector("re:(?:a{3000}){3000}")


def test_a_long_part_repeated_within_the_product_is_invalid() -> None:
    # 800 classes repeated 1000 times: within both repeat caps, yet 200 MB to compile.
    with pytest.raises(InvalidArgumentError, match="counted repeats expand"):
        parse_selector("re:(?:" + "[ab]" * 800 + "){1000}")


def test_escaped_braces_are_not_counted_repeats() -> None:
    selector = parse_selector(r"re:^a\{5000}")
    assert selector.user_regex is not None and selector.user_regex.search("a{5000}")


def test_an_allowed_counted_repeat_compiles_and_matches() -> None:
    names = ["a" * 10_000 + ".weight", "a" * 9_999 + ".weight", "b.weight"]
    index = NameIndex(names)
    assert list(index.match("re:^(?:a{100}){100}\\.")) == [0]
    assert list(index.match("re:^layer[0-9]{1,3}\\.")) == []
    assert list(NameIndex(["layer12.weight", "layer1234.weight"]).match(r"re:^layer[0-9]{1,3}\.")) == [0]


def test_a_huge_repeat_regex_over_grpc_is_invalid_and_training_goes_on(served: Served) -> None:
    served.step()
    for selector in ("re:(?:a{3000}){3000}", "re:(?:a{1000}){1000}", "re:" + "x" * 100_000):
        error = rpc_error(
            lambda: served.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute(selector, 0.1)]), timeout=T)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        error = rpc_error(
            lambda: served.stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=[selector]), timeout=T)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    served.step(3)
    assert served.rates() == SEED_LRS
    # An allowed counted repeat still selects: applied at the next step.
    served.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("re:^layer[0-9]{1}\\.bias$", 0.5)]), timeout=T)
    served.step()
    rates = served.rates()
    assert {n: r for n, r in rates.items() if n.endswith(".bias")} == {n: 0.5 for n in rates if n.endswith(".bias")}


_PARTS = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up", "mlp.down", "mlp.gate", "ln1", "ln2", "ln3"]


@pytest.fixture(scope="module")
def big_index() -> NameIndex:
    return NameIndex([f"model.layers.{i // 10}.{_PARTS[i % 10]}.weight" for i in range(100_000)])


@pytest.mark.parametrize(
    "typo, meant",
    [
        ("model.layers.4242.attn.q_proj.wieght", "model.layers.4242.attn.q_proj.weight"),
        ("modle.layers.4242.mlp.gate.weight", "model.layers.4242.mlp.gate.weight"),
        ("model.layers.4242.mlp.gaet.weight", "model.layers.4242.mlp.gate.weight"),
        ("model.layers.4242.attn.k_prj.weight", "model.layers.4242.attn.k_proj.weight"),
        ("model.layer.4242.ln2.weight", "model.layers.4242.ln2.weight"),
        ("model.layers.9999.ln3.weighx", "model.layers.9999.ln3.weight"),
    ],
)
def test_not_found_on_100k_names_suggests_the_name_a_typo_misspells(big_index: NameIndex, typo: str, meant: str) -> None:
    assert big_index.match(typo) == ()
    error = big_index.not_found(parse_selector(typo))
    assert isinstance(error, NotFoundError)
    assert f"did you mean {meant!r}" in str(error)


def test_small_models_still_compare_every_name() -> None:
    error = NameIndex(["layer1.weight", "layer1.bias", "layer2.weight"]).not_found(parse_selector("layer1.wieght"))
    assert "did you mean 'layer1.weight'" in str(error)
