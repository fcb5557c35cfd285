# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The loader's states are complete only once the model drained the stream.

A stream records a weight's state when it yields the weight, and a 4-bit
weight may wait for state components stored after it; `LoadSession` refuses
to hand out the states before the stream has run out.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vllm.plugins.bitsandbytes.loader import LoadSession


def recording_stream(states: dict):
    for name in ("a.weight", "b.weight"):
        states[name] = name.upper()
        yield name, torch.zeros(1)


def session() -> LoadSession:
    return LoadSession(nn.Linear(2, 2), SimpleNamespace(expert_params=set()))


def test_states_are_refused_until_the_stream_is_drained():
    load = session()
    weights = load.stream(recording_stream)
    next(weights)
    with pytest.raises(RuntimeError, match="Linear.load_weights returned before"):
        load.states  # noqa: B018
    with pytest.raises(RuntimeError, match="states are incomplete"):
        load.finish(None)
    assert [name for name, _ in weights] == ["b.weight"]
    assert load.states == {"a.weight": "A.WEIGHT", "b.weight": "B.WEIGHT"}


def test_stream_is_opened_before_the_model_reads():
    opened = []
    session().stream(lambda states: opened.append(states) or iter(()))
    assert opened == [{}]
