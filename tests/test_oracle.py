# SPDX-License-Identifier: Apache-2.0
"""The fork must load and run every case bit-identically to upstream 0.27.1.

Upstream (the pristine base tree) and the fork run each case of
``tests.oracle.cases.MATRIX`` in their own processes; parameter and quant-state
digests, greedy tokens and top logprobs must be equal. A negative test runs
upstream with a one-element bug in a weight loader to show that the oracle
does notice a difference.
"""

import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.oracle.cases import MATRIX, NEGATIVE_CASE
from tests.oracle.harness import (
    Perturbation,
    build_perturbed_tree,
    compare,
    fork,
    perturbed,
    pristine_dir,
    run_case,
    run_cases,
    upstream,
)

pytestmark = pytest.mark.engine

# Bumps the first element of every weight RowParallelLinear.weight_loader
# copies: small enough to leave most tokens alone, so only the digests can be
# relied on to catch it.
ROW_PARALLEL_BUG = Perturbation(
    path="vllm/model_executor/layers/linear.py",
    anchor="class RowParallelLinear",
    old="param_data.copy_(loaded_weight)",
    new="param_data.copy_(loaded_weight); param_data.view(-1)[:1] += 1",
)

Results = dict[str, dict[str, dict[str, Any]]]


def _error_text(result: dict[str, Any]) -> str:
    error = result.get("error", {})
    return f"{error.get('type')}: {error.get('message')}"


@pytest.fixture(scope="session")
def pristine() -> Path:
    """The upstream tree both tests need; its absence is an error, not a skip."""
    if not (pristine_dir() / "vllm").is_dir():
        pytest.fail(
            f"no pristine upstream tree at {pristine_dir()}: materialize it "
            "with the fork tooling or point FORK_PRISTINE_DIR at one"
        )
    return pristine_dir()


@pytest.fixture(scope="session")
def results(request: pytest.FixtureRequest, pristine: Path) -> Results:
    """The selected cases on both sides, batched (and cached) in one go."""
    # Only what ``-k``/node ids selected, so a single case stays quick.
    selected = {
        item.callspec.params["case"].id
        for item in request.session.items
        if item.originalname == "test_fork_matches_upstream"
    }
    cases = [c for c in MATRIX if c.id in selected]
    return {
        "upstream": run_cases(cases, upstream()),
        "fork": run_cases(cases, fork()),
    }


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_fork_matches_upstream(case, results: Results, record_property) -> None:
    up, fk = results["upstream"][case.id], results["fork"][case.id]
    if case.expected_upstream_failure is None:
        assert up["status"] == "ok", f"upstream failed: {_error_text(up)}"
        diffs = compare(up, fk)
        assert not diffs, f"{len(diffs)} differences:\n" + "\n".join(diffs[:40])
        return
    assert up["status"] == "error", "upstream no longer fails: update the case"
    assert case.expected_upstream_failure in _error_text(up), _error_text(up)
    outcome = "ok" if fk["status"] == "ok" else _error_text(fk)
    record_property("fork_outcome", outcome)
    warnings.warn(
        f"{case.id}: upstream fails as expected ({_error_text(up)}); fork: {outcome}",
        stacklevel=1,
    )


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
