"""The objective registry: names, validation, hyper-parameters, immutability and entry points."""

from __future__ import annotations

import dataclasses
import math
import sys
import textwrap

import pytest
import torch
from diffusers import DDPMScheduler

from sipo_plugin.objectives import (
    LossOutput,
    ObjectiveSpec,
    UnknownObjectiveError,
    available_objectives,
    describe_objectives,
    get_objective,
    register_objective,
)
from sipo_plugin.objectives import registry

BUILT_INS = ["diffusion-dpo", "dpo-cm", "sft", "sipo"]


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made by a test vanish after it; entry points are read afresh."""
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    scale: float = 1.0


def toy_objective(pairs, config):
    """Toy: scale * (m_w - m_l)."""
    return LossOutput(config.scale * (pairs.policy_err_w - pairs.policy_err_l), {})


def test_built_ins_are_listed_sorted_with_descriptions():
    names = available_objectives()
    assert names == sorted(names) and set(BUILT_INS) <= set(names)
    descriptions = describe_objectives()
    assert list(descriptions) == names
    assert all(d and "\n" not in d for d in descriptions.values())


@pytest.mark.parametrize("name", BUILT_INS)
def test_hyperparameters_round_trip_and_config_is_frozen(name):
    objective = get_objective(name)
    assert objective.name == name
    rebuilt = get_objective(name, **objective.hyperparameters())
    assert rebuilt.config == objective.config
    if dataclasses.fields(objective.config):
        field = dataclasses.fields(objective.config)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(objective.config, field, 1.0)


def test_hyperparameter_names_and_defaults():
    assert get_objective("diffusion-dpo").hyperparameters() == {
        "beta": 5000.0, "label_smoothing": 0.0, "loss_type": "sigmoid", "sft_weight": 0.0,
    }
    sipo = get_objective("sipo").hyperparameters()
    assert sipo == {
        "beta": 5000.0, "label_smoothing": 0.0, "loss_type": "sigmoid", "sft_weight": 0.0,
        "clip_eps": 0.1, "mask_threshold": 0.9, "kappa": "auto", "target_mask_fraction": 0.06,
        "weight_model": "step", "pair_weight": "per_side",
    }
    assert set(get_objective("dpo-cm").hyperparameters()) == set(sipo) - {"pair_weight"}
    assert get_objective("sft").hyperparameters() == {}


def test_with_kappa_returns_a_new_objective():
    objective = get_objective("dpo-cm", beta=1000)
    calibrated = objective.with_kappa(3.2e4)
    assert calibrated is not objective and calibrated.config.kappa == 3.2e4
    assert objective.config.kappa == "auto" and objective.needs_calibration
    assert not calibrated.needs_calibration and calibrated.config.beta == 1000.0
    assert not get_objective("diffusion-dpo").needs_calibration
    with pytest.raises(ValueError, match="no kappa"):
        get_objective("diffusion-dpo").with_kappa(1.0)
    with pytest.raises(ValueError, match="kappa"):
        objective.with_kappa(-1.0)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("diffusion-dpo", {"beta": -1.0}, r"beta must be in \(0"),
        ("diffusion-dpo", {"beta": math.nan}, "beta must be finite"),
        ("diffusion-dpo", {"beta": "big"}, "beta must be a number"),
        ("diffusion-dpo", {"label_smoothing": 0.7}, "label_smoothing"),
        ("diffusion-dpo", {"loss_type": "sigmod"}, "did you mean 'sigmoid'"),
        ("diffusion-dpo", {"sft_weight": -0.1}, "sft_weight"),
        ("dpo-cm", {"clip_eps": 1.0}, r"clip_eps must be in \[0, 1\)"),
        ("dpo-cm", {"clip_eps": -0.1}, "clip_eps"),
        ("dpo-cm", {"mask_threshold": 1.0}, "mask_threshold"),
        ("dpo-cm", {"target_mask_fraction": 1.0}, "target_mask_fraction"),
        ("dpo-cm", {"kappa": 0.0}, "kappa"),
        ("dpo-cm", {"kappa": "calibrate"}, "'auto' or a positive number"),
        ("dpo-cm", {"kappa": math.inf}, "kappa must be finite"),
        ("dpo-cm", {"weight_model": "ref"}, "did you mean 'reference'"),
        ("dpo-cm", {"weight_model": "reference"}, "set kappa to a number"),
        ("sipo", {"mask_threshold": 0.0}, "mask_threshold > 0"),
        ("sipo", {"pair_weight": "shared-max"}, "did you mean 'shared_max'"),
    ],
)
def test_invalid_hyperparameter_values(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_objective(name, **kwargs)


def test_unknown_hyperparameter_names_suggest_the_closest():
    with pytest.raises(ValueError, match="unknown hyper-parameter 'bta'.*did you mean 'beta'"):
        get_objective("sipo", bta=1.0)
    with pytest.raises(ValueError, match="did you mean 'clip_eps'"):
        get_objective("dpo-cm", clip_epsilon=0.2)
    with pytest.raises(ValueError, match="accepted: none"):
        get_objective("sft", beta=1.0)


def test_unknown_objective_names_the_closest_and_lists_all():
    with pytest.raises(UnknownObjectiveError) as info:
        get_objective("sipoo")
    message = str(info.value)
    assert "did you mean 'sipo'" in message.lower()
    assert all(name in message for name in BUILT_INS)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(UnknownObjectiveError, match="'diffusion-dpo'"):
        get_objective("diffusion_dpo")


def test_register_validates(isolated_registry):
    ok = {"fn": toy_objective, "config_cls": ToyConfig}
    for bad in ("Toy", "toy_objective", "", "-toy", "toy-", "to y", 3):
        with pytest.raises(ValueError, match="lowercase"):
            register_objective(name=bad, **ok)
    with pytest.raises(ValueError, match="already registered"):
        register_objective(name="sipo", **ok)
    with pytest.raises(TypeError, match="callable"):
        register_objective(name="toy", fn=42, config_cls=ToyConfig)
    with pytest.raises(TypeError, match="dataclass"):
        register_objective(name="toy", fn=toy_objective, config_cls=dict)

    @dataclasses.dataclass
    class Mutable:
        scale: float = 1.0

    with pytest.raises(TypeError, match="frozen"):
        register_objective(name="toy", fn=toy_objective, config_cls=Mutable)
    spec = register_objective(name="toy-2", **ok)
    assert spec.description == "Toy: scale * (m_w - m_l)."  # docstring fallback
    with pytest.raises(ValueError, match="already registered"):
        register_objective(name="toy-2", **ok)


def test_register_objective_as_a_decorator(isolated_registry):
    def calibrate(config, sample, scheduler):
        return dataclasses.replace(config, scale=3.0)

    def uncalibrated(config):
        return config.scale == 1.0

    @register_objective(name="toy-decorated", config_cls=ToyConfig, needs_reference=False,
                        calibrate=calibrate, needs_calibration=uncalibrated)
    def decorated(pairs, config):
        """Toy, registered by decorator: scale * (m_w - m_l),
        over two lines.

        The rest of the docstring is not the description.
        """
        return toy_objective(pairs, config)

    assert decorated.__name__ == "decorated" and decorated.__doc__.startswith("Toy")
    spec = registry.get_objective_spec("toy-decorated")
    assert spec.fn is decorated and spec.config_cls is ToyConfig and spec.calibrate is calibrate
    assert spec.needs_calibration is uncalibrated
    assert spec.needs_reference is False
    assert spec.description == "Toy, registered by decorator: scale * (m_w - m_l), over two lines."
    objective = get_objective("toy-decorated").calibrate(([torch.ones(2)], [torch.ones(1)]), None)
    model_pred = torch.tensor([[2.0], [1.0]])  # m_w = 4, m_l = 1
    out = objective(model_pred, None, torch.zeros(2, 1), torch.tensor([3]), DDPMScheduler())
    assert out.loss.item() == 9.0  # the calibrated scale 3 * (4 - 1)
    with pytest.raises(ValueError, match="already registered"):
        register_objective(name="toy-decorated", config_cls=ToyConfig)(toy_objective)
    with pytest.raises(ValueError, match="lowercase"):  # checked when it decorates
        register_objective(name="Toy", config_cls=ToyConfig)(toy_objective)


def test_registered_objective_runs_through_the_objective_api(isolated_registry):
    register_objective(name="toy", fn=toy_objective, config_cls=ToyConfig, description="toy")
    assert "toy" in available_objectives() and describe_objectives()["toy"] == "toy"
    model_pred = torch.tensor([[2.0], [1.0]], requires_grad=True)  # m_w = 4, m_l = 1
    target = torch.zeros(2, 1)
    objective = get_objective("toy", scale=2.0)
    out = objective(model_pred, target, target, torch.tensor([3]), DDPMScheduler())
    assert out.loss.item() == 6.0 and out.metrics == {"loss": 6.0}
    out.loss.backward()
    assert model_pred.grad.tolist() == [[8.0], [-4.0]]


PLUGIN_MODULE = '''
import dataclasses
from sipo_plugin.objectives import LossOutput, ObjectiveSpec, register_objective


@dataclasses.dataclass(frozen=True)
class MyConfig:
    margin: float = 0.5


def my_objective(pairs, config):
    """My objective: hinge on the winner-loser error gap."""
    gap = pairs.policy_err_w - pairs.policy_err_l + config.margin
    return LossOutput(gap.clamp(min=0.0), {"gap": gap.detach().mean()})


def register():
    register_objective(name="my-objective", fn=my_objective, config_cls=MyConfig)


SPEC = ObjectiveSpec(name="my-spec-objective", fn=my_objective, config_cls=MyConfig,
                     description="the same, registered from a spec")
'''


def write_plugin(tmp_path, module: str, entry_points: str) -> None:
    (tmp_path / f"{module}.py").write_text(PLUGIN_MODULE)
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_entry_point_plugin_is_found(tmp_path, monkeypatch, isolated_registry):
    write_plugin(
        tmp_path,
        "my_objective_pkg",
        """\
        [sipo_plugin.objectives]
        my-objective = my_objective_pkg:register
        my-spec-objective = my_objective_pkg:SPEC
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_objective_pkg", raising=False)
    objective = get_objective("my-objective", margin=1.0)  # lazy load on an unknown name
    assert objective.name == "my-objective" and objective.config.margin == 1.0
    names = available_objectives()
    assert {"my-objective", "my-spec-objective"} <= set(names) and set(BUILT_INS) <= set(names)
    assert describe_objectives()["my-spec-objective"] == "the same, registered from a spec"
    model_pred = torch.tensor([[1.0], [2.0]], requires_grad=True)  # m_w = 1, m_l = 4
    zeros = torch.zeros(2, 1)
    out = objective(model_pred, zeros, zeros, torch.tensor([5]), DDPMScheduler())
    assert out.loss.item() == 0.0 and out.metrics["gap"] == -2.0
    assert get_objective("my-spec-objective").config.margin == 0.5


def test_broken_entry_point_warns_and_keeps_built_ins(tmp_path, monkeypatch, isolated_registry):
    write_plugin(
        tmp_path,
        "broken_objective_pkg",
        """\
        [sipo_plugin.objectives]
        broken = broken_objective_pkg:does_not_exist
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="skipping objective plugin 'broken'"):
        names = available_objectives()
    assert set(BUILT_INS) <= set(names)
    assert ObjectiveSpec in type(registry._SPECS["sipo"]).__mro__
