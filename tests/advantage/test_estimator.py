"""cppo_grpo against a float64 loop reference, verl's grpo, and through verl's own advantage call sites; its
settings validated on verl 0.9.1's real trainer config (FSDP and Megatron)."""

import math
import uuid

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories
from verl.utils.config import omega_conf_to_dataclass

from tests.support.advantage_reference import reference_cppo_grpo
from tests.support.verl_hydra import ENGINES, compose_trainer
from verl_cppo import CPPOAlgoConfig, CPPOGRPOConfig
from verl_cppo.advantage.estimator import compute_cppo_grpo_advantage
from verl_cppo.advantage.exclusion import KEEP_FIELD, capture_exclusions
from verl_cppo.config import CPPO_ALGO_TARGET, cppo_grpo_config_of
from verl_cppo.launch.driver import validate as validate_cppo_grpo_config

ALGO_TARGET = f"algorithm._target_={CPPO_ALGO_TARGET}"
CPPO_GRPO = ["algorithm.adv_estimator=cppo_grpo", "actor_rollout_ref.rollout.n=8"]
"""Selects the estimator with groups of 8 responses (verl's default rollout.n=1 is refused)."""


def random_groups(seed, n_groups=24, width=12):
    """Interleaved groups of 1..16 responses: binary, tied, all-equal, single and continuous scores."""
    gen = torch.Generator().manual_seed(seed)
    uids, scores = [], []
    for g in range(n_groups):
        size = int(torch.randint(1, 17, (), generator=gen))
        kind = g % 5
        if kind == 0:
            vals = torch.randint(0, 2, (size,), generator=gen).double()  # binary: often all-equal
        elif kind == 1:
            vals = torch.full((size,), 0.1, dtype=torch.float64)  # all equal, not exactly representable
        elif kind == 2:
            vals = torch.randint(0, 3, (size,), generator=gen).double() * 0.5  # ties
        else:
            vals = torch.randn(size, generator=gen, dtype=torch.float64)
        uid = str(uuid.UUID(int=int(torch.randint(0, 2**62, (), generator=gen))))
        uids += [uid] * size
        scores += vals.tolist()
    perm = torch.randperm(len(uids), generator=gen).tolist()
    uids = np.array([uids[i] for i in perm], dtype=object)
    scores = torch.tensor([scores[i] for i in perm], dtype=torch.float64)
    lengths = torch.randint(1, width + 1, (len(uids),), generator=gen)
    mask = (torch.arange(width) < lengths[:, None]).long()  # [B, T]
    mask[:, 1] &= torch.randint(0, 2, (len(uids),), generator=gen)  # interior holes (multi-turn)
    rewards = torch.zeros(len(uids), width, dtype=torch.float64)
    rewards[torch.arange(len(uids)), lengths - 1] = scores  # outcome reward on the last response token
    return rewards, mask, uids


def _settings(norm, exclude, atol=0.0, eps=1e-6):
    return {"norm_adv_by_std": norm, "exclude_zero_variance": exclude, "zero_variance_atol": atol, "std_epsilon": eps}


SETTINGS = [(n, e) for n in (False, True) for e in (True, False)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("norm", "exclude"), SETTINGS, ids=[f"norm={n}-exclude={e}" for n, e in SETTINGS])
def test_matches_float64_reference(seed, norm, exclude):
    rewards, mask, uids = random_groups(seed)
    algo = OmegaConf.create({"cppo_grpo": _settings(norm, exclude)})
    with capture_exclusions() as captured:
        adv, ret = compute_cppo_grpo_advantage(rewards, mask, index=uids, config=algo)
    ref_adv, ref_kept = reference_cppo_grpo(rewards.sum(-1).tolist(), uids, norm, 1e-6, exclude)
    expected = torch.tensor(ref_adv, dtype=torch.float64)[:, None] * mask
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert ret is adv
    assert len(captured) == int(exclude)
    if exclude:
        assert captured[0].keep.tolist() == ref_kept
        assert captured[0].num_groups == len(set(uids))
        assert 0 < captured[0].num_excluded_groups < captured[0].num_groups


def test_zero_variance_groups_get_exactly_zero_and_are_excluded():
    """0.1 * 3 / 3 != 0.1 in floating point: the naive centring leaves ~1e-17; cppo_grpo gives exact 0."""
    rewards = torch.tensor([[0.1], [0.1], [0.1], [1.0], [0.0], [0.7]], dtype=torch.float32)
    uids = np.array(["a", "a", "a", "b", "b", "c"], dtype=object)
    for norm in (False, True):
        with capture_exclusions() as captured:
            adv, _ = compute_cppo_grpo_advantage(
                rewards, torch.ones_like(rewards), uids, OmegaConf.create({"cppo_grpo": {"norm_adv_by_std": norm}})
            )
        assert adv.dtype == torch.float32
        assert adv[[0, 1, 2, 5], 0].tolist() == [0.0] * 4  # all-equal group, single-response group
        assert captured[0].keep.tolist() == [False, False, False, True, True, False]
        assert (captured[0].num_groups, captured[0].num_excluded_groups) == (3, 2)
    assert adv[3, 0] == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6)) and adv[4, 0] == -adv[3, 0]


def test_zero_variance_tolerance():
    rewards = torch.tensor([[1.0], [1.0 + 1e-5], [0.0], [1.0]], dtype=torch.float64)
    uids = np.array(["a", "a", "b", "b"], dtype=object)
    for atol, expect_a in ((0.0, [-5e-6, 5e-6]), (1e-4, [0.0, 0.0])):
        with capture_exclusions() as captured:
            adv, _ = compute_cppo_grpo_advantage(
                rewards, torch.ones_like(rewards), uids, {"cppo_grpo": {"zero_variance_atol": atol}}
            )
        torch.testing.assert_close(adv[:2, 0], torch.tensor(expect_a, dtype=torch.float64), rtol=0, atol=1e-15)
        assert captured[0].keep.tolist() == [atol == 0.0] * 2 + [True, True]


@pytest.mark.parametrize("norm", [False, True])
def test_equals_verl_grpo_on_groups_with_spread(norm):
    """Where verl's grpo is well defined (groups of >= 2 responses with distinct scores) cppo_grpo is grpo."""
    gen = torch.Generator().manual_seed(7)
    uids = np.array([f"g{i // 8}" for i in range(64)], dtype=object)
    rewards = torch.zeros(64, 5)
    rewards[:, -1] = torch.randn(64, generator=gen)
    mask = torch.ones(64, 5, dtype=torch.int64)
    ours, _ = compute_cppo_grpo_advantage(rewards, mask, uids, {"cppo_grpo": {"norm_adv_by_std": norm}})
    verl_adv, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(ours, verl_adv, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- verl's call sites, registry


def _data_proto(rewards, mask, uids):
    return DataProto.from_dict(
        tensors={"token_level_rewards": rewards.float(), "response_mask": mask}, non_tensors={"uid": uids}
    )


def _as_the_trainers_call(data, algorithm):
    """verl 0.9.1's trainers: compute_advantage(data, adv_estimator=..., ..., config=config.algorithm)."""
    return compute_advantage(
        data,
        adv_estimator=algorithm.adv_estimator,
        gamma=algorithm.gamma,
        lam=algorithm.lam,
        num_repeat=4,
        norm_adv_by_std_in_grpo=algorithm.get("norm_adv_by_std_in_grpo", True),
        config=algorithm,
    )


def test_registered_under_its_name():
    assert core_algos.get_adv_estimator_fn("cppo_grpo") is compute_cppo_grpo_advantage


OVERRIDES = {
    "defaults": CPPO_GRPO,  # verl's norm_adv_by_std_in_grpo=True is not read
    "std": [*CPPO_GRPO, ALGO_TARGET, "+algorithm.cppo_grpo.norm_adv_by_std=true"],
    "no_exclusion": [
        *CPPO_GRPO,
        ALGO_TARGET,
        "+algorithm.cppo_grpo.exclude_zero_variance=false",
    ],
}


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_through_verl_call_site_with_composed_config(case):
    cfg = compose_trainer("dp", OVERRIDES[case])
    validate_cppo_grpo_config(cfg)
    norm, exclude = case == "std", case != "no_exclusion"
    rewards, mask, uids = random_groups(11)
    data = _as_the_trainers_call(_data_proto(rewards, mask, uids), cfg.algorithm)
    ref_adv, ref_kept = reference_cppo_grpo(rewards.float().sum(-1).tolist(), uids, norm, 1e-6, exclude)
    expected = torch.tensor(ref_adv, dtype=torch.float32)[:, None] * mask
    torch.testing.assert_close(data.batch["advantages"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(data.batch["returns"], expected, rtol=1e-6, atol=1e-6)
    if exclude:  # the trainer-side hook stored the estimator's decision with the batch
        assert data.batch[KEEP_FIELD].tolist() == ref_kept
    else:
        assert KEEP_FIELD not in data.batch.keys()


def test_v1_multi_trajectory_call_site_gives_the_same_advantages():
    cfg = compose_trainer("dp", CPPO_GRPO)
    rewards, mask, uids = random_groups(12)
    keys = [f"{uid}_0_{i}" for i, uid in enumerate(uids)]
    with capture_exclusions() as captured:
        data = compute_advantage_for_multi_trajectories(
            _data_proto(rewards, mask, uids), batch_keys=keys, adv_estimator="cppo_grpo", config=cfg.algorithm
        )
    ref_adv, ref_kept = reference_cppo_grpo(rewards.float().sum(-1).tolist(), uids)
    torch.testing.assert_close(data.batch["advantages"], torch.tensor(ref_adv)[:, None] * mask, rtol=1e-6, atol=1e-6)
    assert [c.keep.tolist() for c in captured] == [ref_kept]  # what the v1 trainer hook stores in TransferQueue


# ----------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_named():
    rewards, mask = torch.zeros(3, 4), torch.ones(3, 4)
    uids = np.array(["a", "a", "b"], dtype=object)
    with pytest.raises(ValueError, match=r"needs the group index .*uid"):
        compute_cppo_grpo_advantage(rewards, mask, None)
    with pytest.raises(ValueError, match="index has 2 entries for 3 responses"):
        compute_cppo_grpo_advantage(rewards, mask, uids[:2])
    with pytest.raises(ValueError, match=r"response_mask \(3, 5\) must both be"):
        compute_cppo_grpo_advantage(rewards, torch.ones(3, 5), uids)
    rewards[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"non-finite score in rows \[1\]: \[nan\]"):
        compute_cppo_grpo_advantage(rewards, mask, uids)


# ------------------------------------------------------------------------------------------- settings

DEFAULTS = {"norm_adv_by_std": False, "std_epsilon": 1e-6, "exclude_zero_variance": True, "zero_variance_atol": 0.0}

INVALID = [
    ("norm_adv_by_std", "yes", "true or false"),
    ("norm_adv_by_std", 1, "true or false"),
    ("exclude_zero_variance", None, "true or false"),
    ("std_epsilon", 0.0, r"in \(0, inf\)"),
    ("std_epsilon", -1e-3, r"in \(0, inf\)"),
    ("std_epsilon", math.inf, r"in \(0, inf\)"),
    ("std_epsilon", "small", r"a number in \(0, inf\)"),
    ("zero_variance_atol", -1e-9, r"in \[0, inf\)"),
    ("zero_variance_atol", math.nan, r"a number in \[0, inf\)"),
    ("zero_variance_atol", True, r"a number in \[0, inf\)"),
]


def test_defaults_are_the_authors():
    cfg = CPPOGRPOConfig()
    assert {k: cfg[k] for k in DEFAULTS} == DEFAULTS
    assert cppo_grpo_config_of(None) == cfg
    assert cppo_grpo_config_of(OmegaConf.create({"adv_estimator": "cppo_grpo"})) == cfg


@pytest.mark.parametrize(("key", "value", "allowed"), INVALID, ids=[f"{k}={v!r}" for k, v, _ in INVALID])
def test_invalid_values_name_the_key_and_the_range(key, value, allowed):
    with pytest.raises(ValueError, match=rf"cppo_grpo\.{key} must be {allowed}, got ") as info:
        CPPOGRPOConfig(**{key: value})
    assert str(info.value).endswith(f"got {value!r}")


def test_ints_become_floats_unknown_keys_refused():
    cfg = CPPOGRPOConfig(std_epsilon=1, zero_variance_atol=0)
    assert (cfg.std_epsilon, cfg.zero_variance_atol) == (1.0, 0.0) and isinstance(cfg.std_epsilon, float)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['norm_by_std'\]; known keys: \[.*'std_epsilon'"):
        cppo_grpo_config_of({"cppo_grpo": {"norm_by_std": True}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['eps'\]"):
        CPPOAlgoConfig(cppo_grpo={"eps": 1.0})


@pytest.mark.parametrize("engine", ENGINES)
def test_hydra_form_on_verl_config(engine):
    cfg = compose_trainer(
        engine,
        [
            *CPPO_GRPO,
            ALGO_TARGET,
            "+algorithm.cppo_grpo.norm_adv_by_std=true",
            "+algorithm.cppo_grpo.std_epsilon=1e-4",
        ],
    )
    validate_cppo_grpo_config(cfg)
    algo = omega_conf_to_dataclass(cfg.algorithm)
    assert type(algo) is CPPOAlgoConfig and algo.adv_estimator == "cppo_grpo"
    assert algo.cppo_grpo == CPPOGRPOConfig(norm_adv_by_std=True, std_epsilon=1e-4)
    assert algo.rollout_correction is not None and algo.gamma == 1.0  # verl's fields untouched
    assert cppo_grpo_config_of(cfg.algorithm) == algo.cppo_grpo  # what the estimator reads from the DictConfig


def test_yaml_form_on_verl_config(tmp_path):
    (tmp_path / "cppo_grpo.yaml").write_text(
        "hydra:\n  searchpath: [pkg://verl.trainer.config]\n"
        "defaults: [ppo_trainer, _self_]\n"
        "algorithm:\n"
        f"  _target_: {CPPO_ALGO_TARGET}\n"
        "  adv_estimator: cppo_grpo\n"
        "  cppo_grpo: {exclude_zero_variance: false, zero_variance_atol: 1.0e-6}\n"
        "actor_rollout_ref: {rollout: {n: 8}}\n"
    )
    cfg = compose_trainer("dp", config_name="cppo_grpo", config_dir=str(tmp_path))
    validate_cppo_grpo_config(cfg)
    assert cppo_grpo_config_of(cfg.algorithm) == CPPOGRPOConfig(exclude_zero_variance=False, zero_variance_atol=1e-6)


def test_invalid_value_stops_the_driver_naming_key_and_range():
    cfg = compose_trainer("dp", [*CPPO_GRPO, ALGO_TARGET, "+algorithm.cppo_grpo.std_epsilon=0"])
    with pytest.raises(ValueError, match=r"cppo_grpo\.std_epsilon must be in \(0, inf\), got 0") as info:
        validate_cppo_grpo_config(cfg)
    assert "full_key: algorithm" in str(info.value)


def test_node_without_target_gets_the_plugins_class():
    """One override per setting: the driver points verl's stock AlgoConfig node at CPPOAlgoConfig."""
    cfg = compose_trainer("dp", [*CPPO_GRPO, "+algorithm.cppo_grpo.norm_adv_by_std=true"])
    validate_cppo_grpo_config(cfg)
    assert cfg.algorithm._target_ == CPPO_ALGO_TARGET
    assert omega_conf_to_dataclass(cfg.algorithm).cppo_grpo.norm_adv_by_std is True


def test_verl_validate_config_runs_the_check_before_its_own():
    """The driver check the plugin installs: verl's validate_config refuses the setting before Ray starts."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    cfg = compose_trainer("dp", [*CPPO_GRPO, ALGO_TARGET, "+algorithm.cppo_grpo.zero_variance_atol=-1"])
    with pytest.raises(ValueError, match=r"cppo_grpo\.zero_variance_atol must be in \[0, inf\)"):
        validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert need_critic(cfg) is False  # an outcome estimator: no critic


@pytest.mark.parametrize("exclude", [True, False])
def test_one_response_per_prompt_is_refused_before_ray_starts(exclude):
    """With rollout.n = 1 every group has one response: advantage 0 everywhere (and every group excluded)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    overrides = ["algorithm.adv_estimator=cppo_grpo"]
    if not exclude:
        overrides += [ALGO_TARGET, "+algorithm.cppo_grpo.exclude_zero_variance=false"]
    cfg = compose_trainer("dp", [*overrides, "actor_rollout_ref.rollout.n=1"])
    with pytest.raises(ValueError, match=r"adv_estimator=cppo_grpo with actor_rollout_ref\.rollout\.n=1"):
        validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    validate_cppo_grpo_config(compose_trainer("dp", [*overrides, "actor_rollout_ref.rollout.n=2"]))
