# SPDX-License-Identifier: Apache-2.0
"""The fork must load and run every case bit-identically to its references.

Each case of ``tests.oracle.cases.MATRIX`` runs in its own processes on the
fork and on the references ``cases.references`` names:

- ``legacy``: pristine vLLM 0.27.1, the last release with bitsandbytes in
  core. Parameter and quant-state digests, tokens and logprobs must be
  identical: on CPU with torch 2.13.0 the 0.27.1 and 0.32.0 engines agree
  on every case of the matrix, so none is exempt from the token check.
- ``bnb-plugin``: pristine vLLM 0.32.0 with ``vllm-bnb-plugin`` 0.0.3, what
  users run today. Digests, tokens and logprobs must be identical on every
  case it can run.
- ``upstream``: pristine 0.32.0 alone, for the unquantized cases.

A reference that cannot run a case must fail the way ``expected_failures``
records; the fork must still run it: load every rank and generate. A
negative test runs upstream with a one-element bug in a weight loader to
show that the oracle does notice a difference.
"""

import math
from pathlib import Path
from typing import Any

import pytest

from tests.oracle.cases import MATRIX, NEGATIVE_CASE, references
from tests.oracle.harness import (
    MAX_TOKENS,
    PROMPTS,
    TOP_LOGPROBS,
    Perturbation,
    bnb_plugin,
    build_perturbed_tree,
    compare,
    fork,
    legacy,
    perturbed,
    pristine_dir,
    run_case,
    run_cases,
    upstream,
)

pytestmark = pytest.mark.engine

REFERENCE_SIDES = {"legacy": legacy, "bnb-plugin": bnb_plugin, "upstream": upstream}
PAIRS = [(case, side) for case in MATRIX for side in references(case)]

# Bumps the first element of every weight RowParallelLinear.weight_loader_v2
# loads (the loader of unquantized weights): small enough to leave most
# tokens alone, so only the digests can be relied on to catch it.
ROW_PARALLEL_BUG = Perturbation(
    path="vllm/model_executor/layers/linear.py",
    anchor="class RowParallelLinear",
    old="param.load_row_parallel_weight(loaded_weight=loaded_weight)",
    new=(
        "param.load_row_parallel_weight(loaded_weight=loaded_weight); "
        "param.data.view(-1)[:1] += 1"
    ),
)

Results = dict[str, dict[str, dict[str, Any]]]


def same_engine_reference(case) -> str:
    """The case's pristine 0.32.0 reference: the fork's own engine."""
    return next(ref for ref in references(case) if ref != "legacy")


def engine_agreement(case, results: Results) -> dict[str, Any]:
    """What the fork is held to 0.27.1 on: what pristine 0.27.1 and pristine
    0.32.0 themselves agree on here (as `compare` arguments).

    The parameters as loaded always. The engines then process weights and
    compute some steps differently, and on some CPUs (an Intel Xeon, not an
    AMD EPYC) that changes the parameters as kept after
    `process_weights_after_loading` (dtypes of CPU linear biases) or the last
    bits of logprobs. Where the pristine releases part, the fork is held to
    0.32.0's result, the case's other reference.
    """
    legacy = results["legacy"][case.id]
    same_engine = results[same_engine_reference(case)][case.id]
    if same_engine["status"] != "ok":
        return {}
    final_agrees = not compare(legacy, same_engine, stages=("final",), generation=False)
    return {
        "stages": ("loaded", "final") if final_agrees else ("loaded",),
        "generation": not compare(legacy, same_engine, stages=()),
    }


def _error_text(result: dict[str, Any]) -> str:
    error = result.get("error", {})
    return f"{error.get('type')}: {error.get('message')}"


def _failure_text(result: dict[str, Any]) -> str:
    """The error and its process log: TP workers report their cause there."""
    log = Path(result.get("log", ""))
    return _error_text(result) + ("\n" + log.read_text() if log.is_file() else "")


@pytest.fixture(scope="session")
def pristine() -> Path:
    """The upstream tree the tests need; its absence is an error, not a skip."""
    for tree in {side().trees for side in REFERENCE_SIDES.values()}:
        for path in tree:
            if not path.is_dir():
                pytest.fail(
                    f"no reference tree at {path}: run `tools/fork.py pristine` "
                    "and `tools/fork.py oracles`"
                )
    return pristine_dir()


@pytest.fixture(scope="session")
def results(request: pytest.FixtureRequest, pristine: Path) -> Results:
    """The selected cases on every side they need, batched (and cached)."""
    # Only what ``-k``/node ids selected, so a single case stays quick.
    selected = [
        (item.callspec.params["case"], item.callspec.params["reference"])
        for item in request.session.items
        if item.originalname == "test_fork_matches_reference"
    ]
    # A case compared with 0.27.1 also needs its 0.32.0 reference, which
    # tells what the two engines agree on (see `engine_agreement`).
    selected += [
        (case, same_engine_reference(case)) for case, ref in selected if ref == "legacy"
    ]
    out: Results = {"fork": run_cases({c.id: c for c, _ in selected}.values(), fork())}
    for name, side in REFERENCE_SIDES.items():
        cases = {c.id: c for c, ref in selected if ref == name}
        out[name] = run_cases(cases.values(), side())
    return out


@pytest.mark.parametrize(
    ("case", "reference"), PAIRS, ids=[f"{c.id}-vs-{r}" for c, r in PAIRS]
)
def test_fork_matches_reference(
    case, reference: str, results: Results, record_property
) -> None:
    ref, fk = results[reference][case.id], results["fork"][case.id]
    expected_failure = case.expected_failures.get(reference)
    if expected_failure is None:
        assert ref["status"] == "ok", f"{reference} failed: {_error_text(ref)}"
        compared = engine_agreement(case, results) if reference == "legacy" else {}
        record_property("compared", compared)
        diffs = compare(ref, fk, **compared)
        assert not diffs, f"{len(diffs)} differences:\n" + "\n".join(diffs[:40])
        return
    assert ref["status"] == "error", f"{reference} no longer fails: update the case"
    assert expected_failure in _failure_text(ref), _error_text(ref)
    record_property("fork_outcome", fk["status"])
    # The fork runs every case of the matrix: it loads on every rank and
    # generates greedily, exactly MAX_TOKENS tokens per prompt, each of the
    # highest logprob of its step. tests/plugins/bitsandbytes compares these
    # loads with exact references (TP=1, bitsandbytes' own quantization).
    assert fk["status"] == "ok", f"fork failed: {_error_text(fk)}"
    assert len(fk["ranks"]) == case.tp
    assert [out["prompt"] for out in fk["generation"]] == [list(p) for p in PROMPTS]
    for out in fk["generation"]:
        assert len(out["token_ids"]) == len(out["logprobs"]) == MAX_TOKENS
        for token, step in zip(out["token_ids"], out["logprobs"], strict=True):
            assert len(step) >= TOP_LOGPROBS
            logprobs = {tok: logprob for _, tok, logprob in step}
            assert all(math.isfinite(logprob) for logprob in logprobs.values())
            assert logprobs[token] == max(logprobs.values())


def test_oracle_detects_perturbed_upstream(pristine: Path, tmp_path: Path) -> None:
    case = next(c for c in MATRIX if c.id == NEGATIVE_CASE)
    reference = run_case(case, upstream())
    tree = build_perturbed_tree(pristine, tmp_path / "tree", [ROW_PARALLEL_BUG])
    result = run_case(case, perturbed(tree))
    assert result["status"] == "ok", _error_text(result)
    edited = tree / ROW_PARALLEL_BUG.path
    assert not edited.is_symlink()
    assert all(
        Path(rank["linear_file"]).resolve() == edited.resolve()
        for rank in result["ranks"]
    ), "the workers did not import the edited linear.py"
    diffs = compare(reference, result)
    assert any("loaded params" in d and "differs" in d for d in diffs), diffs
