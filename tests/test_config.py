"""CPPOConfig validation, and the Hydra form against verl 0.9.1's real config files (FSDP and Megatron)."""

import math
import re
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, InstantiationException
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import FSDPActorConfig, McoreActorConfig, PolicyLossConfig

from tests.support import REPO_ROOT
from tests.support.verl_hydra import CPPO_TARGET, ENGINES, VERL_CONFIG_DIR, compose_trainer
from verl_cppo import CPPOConfig, CPPOGRPOConfig, CPPOPolicyLossConfig
from verl_cppo.config import allowed, cppo_config_of

PAPER_DEFAULTS = {
    "delta": 0.15,
    "w_min": 0.8,
    "delta_b": 0.02,
    "delta_b_quantile": 0.9,
    "delta_b_scale": 1.0,
    "delta_b_max_mult": 2.0,
    "position_horizon": None,
    "divergence": "binary_tv",
    "gate": "hard",
    "ratio_cap": 20.0,
    "position_weight": True,
    "prefix_budget": True,
    "shuffle_positions": False,
}

INVALID = [
    ("delta", 0.0, r"\(0, inf\)"),
    ("delta", -0.1, r"\(0, inf\)"),
    ("delta", math.inf, r"\(0, inf\)"),
    ("delta", "big", "a number"),
    ("delta", math.nan, "a number"),
    ("w_min", 0.0, r"\(0, 1\]"),
    ("w_min", 1.01, r"\(0, 1\]"),
    ("delta_b", -1e-3, r"\[0, inf\)"),
    ("delta_b_quantile", 1.5, r"null or in \[0, 1\]"),
    ("delta_b_quantile", -0.1, r"\[0, 1\]"),
    ("delta_b_scale", 0, r"\(0, inf\)"),
    ("delta_b_max_mult", 0.5, r"\[1, inf\)"),
    ("position_horizon", 0, r"null or an int in \[1, 2147483647\]"),
    ("position_horizon", 8.5, "an int"),
    ("position_horizon", True, "an int"),
    ("divergence", "tv", "one of"),
    ("gate", "medium", "one of"),
    ("ratio_cap", 0.0, r"\(0, inf\]"),
    ("ratio_cap", True, "a number"),
    ("position_weight", "yes", "true or false"),
    ("prefix_budget", 1, "true or false"),
]


def test_defaults_are_the_papers():
    cfg = CPPOConfig()
    assert {k: cfg[k] for k in PAPER_DEFAULTS} == PAPER_DEFAULTS


@pytest.mark.parametrize(("key", "value", "allowed"), INVALID, ids=[f"{k}={v!r}" for k, v, _ in INVALID])
def test_invalid_values_name_the_key_and_the_range(key, value, allowed):
    with pytest.raises(ValueError, match=rf"cppo\.{key} must be .*{allowed}.*, got ") as info:
        CPPOConfig(**{key: value})
    assert str(info.value).endswith(f"got {value!r}")


@pytest.mark.parametrize("name", ["topk_tv", "topk_kl"])
def test_topk_divergences_are_accepted_with_k(name):
    cfg = CPPOConfig(divergence=name, topk=5)
    assert (cfg.divergence, cfg.topk) == (name, 5)
    assert CPPOConfig(divergence=name).topk == 20  # the paper's K


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "20", 2**31])
def test_topk_must_be_a_positive_int32(value):
    with pytest.raises(ValueError, match=rf"cppo\.topk must be an int in \[1, 2147483647\], got {value!r}$"):
        CPPOConfig(topk=value)


@pytest.mark.parametrize("value", [2**31, 10**30])
def test_a_horizon_beyond_int32_is_refused_naming_key_and_value(value):
    """10**30 passed the driver and then overflowed in the loss (int too big to convert) after Ray started."""
    with pytest.raises(
        ValueError, match=rf"cppo\.position_horizon must be null or an int in \[1, 2147483647\], got {value}$"
    ):
        CPPOConfig(position_horizon=value)
    assert CPPOConfig(position_horizon=2**31 - 1).position_horizon == 2**31 - 1


def test_shuffle_requires_position_weight():
    with pytest.raises(ValueError, match=r"shuffle_positions=True requires cppo\.position_weight=True"):
        CPPOConfig(shuffle_positions=True, position_weight=False)


def test_ints_become_floats_and_config_is_frozen():
    cfg = CPPOConfig(delta=1, ratio_cap=math.inf, delta_b=0)
    assert isinstance(cfg.delta, float) and cfg.ratio_cap == math.inf
    with pytest.raises(Exception, match="frozen"):
        cfg.delta = 0.3


def test_policy_loss_config_accepts_a_mapping_and_rejects_unknown_keys():
    cfg = CPPOPolicyLossConfig(loss_mode="cppo", cppo={"delta": 0.3})
    assert isinstance(cfg.cppo, CPPOConfig) and cfg.cppo.delta == 0.3
    assert isinstance(cfg, PolicyLossConfig)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['detla'\]"):
        CPPOPolicyLossConfig(cppo={"detla": 0.3})


@pytest.mark.parametrize("engine", ENGINES)
def test_loss_mode_alone_uses_the_defaults(engine):
    cfg = compose_trainer(engine, ["actor_rollout_ref.actor.policy_loss.loss_mode=cppo"])
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor, FSDPActorConfig if engine == "dp" else McoreActorConfig)
    assert type(actor.policy_loss) is PolicyLossConfig and actor.policy_loss.loss_mode == "cppo"
    assert cppo_config_of(actor) == CPPOConfig()


@pytest.mark.parametrize("engine", ENGINES)
def test_every_field_is_settable_from_the_command_line(engine):
    values = {
        "delta": 0.2,
        "w_min": 0.7,
        "delta_b": 0.015,
        "delta_b_quantile": None,
        "delta_b_scale": 1.5,
        "delta_b_max_mult": 5.0,
        "position_horizon": 8192,
        "divergence": "binary_kl",
        "gate": "soft",
        "ratio_cap": 10.0,
        "position_weight": True,
        "prefix_budget": False,
        "shuffle_positions": True,
    }
    assert set(values) == set(PAPER_DEFAULTS)
    as_cli = {k: "null" if v is None else str(v).lower() if isinstance(v, bool) else v for k, v in values.items()}
    overrides = [CPPO_TARGET, "actor_rollout_ref.actor.policy_loss.loss_mode=cppo"] + [
        f"+actor_rollout_ref.actor.policy_loss.cppo.{k}={v}" for k, v in as_cli.items()
    ]
    actor = omega_conf_to_dataclass(compose_trainer(engine, overrides).actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, CPPOPolicyLossConfig)
    assert {k: actor.policy_loss.cppo[k] for k in values} == values
    assert cppo_config_of(actor) is actor.policy_loss.cppo


@pytest.mark.parametrize("engine", ENGINES)
def test_every_field_is_settable_from_yaml(engine, tmp_path):
    (tmp_path / "my_cppo.yaml").write_text(
        textwrap.dedent(
            f"""\
            hydra:
              searchpath:
                - file://{VERL_CONFIG_DIR}
            defaults:
              - ppo_trainer
              - _self_
            actor_rollout_ref:
              actor:
                policy_loss:
                  _target_: verl_cppo.config.CPPOPolicyLossConfig
                  loss_mode: cppo
                  cppo:
                    delta: 0.2
                    w_min: 0.9
                    delta_b_quantile: null
                    position_horizon: 4096
                    gate: soft
            """
        )
    )
    cfg = compose_trainer(engine, config_name="my_cppo", config_dir=str(tmp_path))
    cppo = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor).policy_loss.cppo
    assert (cppo.delta, cppo.w_min, cppo.delta_b_quantile, cppo.position_horizon, cppo.gate) == (
        0.2,
        0.9,
        None,
        4096,
        "soft",
    )
    assert cppo.delta_b == 0.02  # untouched fields keep the defaults


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("key", "value", "allowed"), [("w_min", "1.5", r"\(0, 1\]"), ("gate", "medium", "one of")])
def test_invalid_value_is_refused_at_instantiation_naming_key_and_range(engine, key, value, allowed):
    cfg = compose_trainer(engine, [CPPO_TARGET, f"+actor_rollout_ref.actor.policy_loss.cppo.{key}={value}"])
    with pytest.raises(InstantiationException, match=rf"cppo\.{key} must be .*{allowed}") as info:
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert "full_key: actor_rollout_ref.actor.policy_loss" in str(info.value)


def test_cppo_keys_without_the_plus_are_refused_by_hydra():
    with pytest.raises(ConfigCompositionException, match=r"policy_loss\.cppo"):
        compose_trainer("dp", [CPPO_TARGET, "actor_rollout_ref.actor.policy_loss.cppo.delta=0.2"])


BEYOND_FLOAT32 = [
    ("delta", 1e39),
    ("delta_b", 1e39),
    ("ratio_cap", 1e39),
    ("delta_b_scale", 3.5e38),
    ("delta_b_max_mult", 1e300),
    ("delta", 10**400),  # an int beyond any float
    ("ratio_cap", -(10**400)),
]


@pytest.mark.parametrize(("key", "value"), BEYOND_FLOAT32, ids=[f"{k}={str(v)[:6]}" for k, v in BEYOND_FLOAT32])
def test_finite_values_beyond_float32_are_refused_naming_key_and_value(key, value):
    """The loss computes in float32: a finite setting beyond it would overflow to inf at the first loss call."""
    with pytest.raises(ValueError, match=rf"cppo\.{key} must be .*, got ") as info:
        CPPOConfig(**{key: value})
    assert str(info.value).endswith(f"got {value!r}")


def test_float32_max_itself_and_inf_where_allowed_are_accepted():
    assert CPPOConfig(ratio_cap=math.inf).ratio_cap == math.inf  # (0, inf]: inf = no truncation
    assert CPPOConfig(delta=3.4e38, delta_b=1e38, delta_b_max_mult=3.0).delta == 3.4e38


def test_the_calibrated_cap_beyond_float32_is_refused():
    with pytest.raises(ValueError, match=r"cppo\.delta_b \* cppo\.delta_b_max_mult must be at most .*got 1e\+38 \* 5"):
        CPPOConfig(delta_b=1e38, delta_b_max_mult=5.0)


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("ratio_cap", "1e39", "1e+39"),
        ("delta_b", "1e39", "1e+39"),
        ("delta", "1" + "0" * 400, "1" + "0" * 400),  # Hydra parses it as a Python int
    ],
    ids=["ratio_cap=1e39", "delta_b=1e39", "delta=10**400"],
)
def test_beyond_float32_is_refused_by_the_driver_through_hydra(key, value, shown):
    """verl's validate_config (wrapped by the plugin, as main_ppo calls it) instantiates the node and refuses."""
    import verl.trainer.main_ppo as main_ppo

    cfg = compose_trainer(
        "dp",
        [
            CPPO_TARGET,
            "actor_rollout_ref.actor.policy_loss.loss_mode=cppo",
            "algorithm.rollout_correction.bypass_mode=true",
            f"+actor_rollout_ref.actor.policy_loss.cppo.{key}={value}",
        ],
    )
    with pytest.raises(
        InstantiationException, match=rf"cppo\.{key} must be .*\(float32\), got {re.escape(shown)}"
    ) as info:
        main_ppo.validate_config(cfg, use_reference_policy=False, use_critic=False)
    assert "full_key: actor_rollout_ref.actor.policy_loss" in str(info.value)


def test_the_calibrated_cap_beyond_float32_is_refused_by_the_driver():
    import verl.trainer.main_ppo as main_ppo

    cfg = compose_trainer(
        "megatron",
        [
            CPPO_TARGET,
            "actor_rollout_ref.actor.policy_loss.loss_mode=cppo",
            "algorithm.rollout_correction.bypass_mode=true",
            "+actor_rollout_ref.actor.policy_loss.cppo.delta_b=1e38",
            "+actor_rollout_ref.actor.policy_loss.cppo.delta_b_max_mult=5",
        ],
    )
    with pytest.raises(InstantiationException, match=r"cppo\.delta_b \* cppo\.delta_b_max_mult must be at most"):
        main_ppo.validate_config(cfg, use_reference_policy=False, use_critic=False)


def _readme_table(heading: str) -> dict[str, tuple[str, str]]:
    """{key: (default, range)} of the first table after README's ``heading`` (a row may list several keys)."""
    text = (Path(REPO_ROOT) / "README.md").read_text(encoding="utf-8")
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| key | default | range |"))
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        keys, default, allowed_cell = (cell.strip() for cell in line.strip("|").split("|")[:3])
        names = [k.strip().strip("`") for k in keys.split(",")]
        defaults = [d.strip() for d in default.split(",")] if len(names) > 1 else [default]
        for name, value in zip(names, defaults, strict=True):
            table[name] = (value, allowed_cell)
    return table


def _as_readme_default(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize(
    ("cls", "heading"),
    [(CPPOConfig, "### Hyper-parameters"), (CPPOGRPOConfig, "### Advantage estimator `cppo_grpo`")],
    ids=["cppo", "cppo_grpo"],
)
def test_readme_tables_state_the_fields_defaults_and_ranges_the_config_checks(cls, heading):
    """README's table is a rendering of the one home of each range (field metadata / type), not a copy."""
    table = _readme_table(heading)
    names = [f.name for f in fields(cls) if f.name != "_target_"]
    assert sorted(table) == sorted(names)
    for f in fields(cls):
        if f.name == "_target_":
            continue
        shown_default, shown_range = table[f.name]
        assert shown_range == allowed(cls, f.name), f.name
        expected = _as_readme_default(f.default)
        if isinstance(f.default, float):
            assert float(shown_default) == f.default, f.name
        else:
            assert shown_default == expected, f.name


@pytest.mark.parametrize("cls", [CPPOConfig, CPPOGRPOConfig])
def test_each_declared_range_is_the_check(cls):
    """For every numeric field: its range's end points and one value beyond each are accepted / refused as the
    declared text says (the check is derived from the text, so a changed text changes the check)."""
    for f in fields(cls):
        if "allowed" not in f.metadata:
            continue
        text = f.metadata["allowed"]
        lo_text, hi_text = text.rsplit("[", 1)[-1].rsplit("(", 1)[-1].rstrip(")]").split(", ")
        lo, hi = float(lo_text), float(hi_text)
        integer = "int in" in text
        below = int(lo) - 1 if integer else lo - 1e-3
        with pytest.raises(ValueError, match=rf"\.{f.name} must be "):
            cls(**{f.name: below})
        closed_low = text.rstrip()[text.index(lo_text) - 1] == "["
        if closed_low:
            cls(**{f.name: int(lo) if integer else lo})
        if integer:
            with pytest.raises(ValueError, match=rf"\.{f.name} must be "):
                cls(**{f.name: int(hi) + 1})
        if text.startswith("null or "):
            assert getattr(cls(**{f.name: None}), f.name) is None


def test_kernel_field_is_validated():
    for value in ("auto", "torch", "triton"):
        assert CPPOConfig(kernel=value).kernel == value
    with pytest.raises(ValueError, match=r"cppo\.kernel must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        CPPOConfig(kernel="cuda")


def test_the_core_tests_plain_parameters_have_the_config_defaults():
    """tests/core builds the core's parameters without verl (``LossParams``): the same defaults as CPPOConfig."""
    from dataclasses import asdict

    from tests.support.reference import LossParams

    config = CPPOConfig()
    assert {key: getattr(config, key) for key in asdict(LossParams())} == asdict(LossParams())
