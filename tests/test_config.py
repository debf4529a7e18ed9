import pytest

from decaf_ray.config import ConfigError, apply_override
from decaf_ray.experiment_config import load_config

BASE = {"task": {"kind": "synthetic"}}


def test_defaults_and_shorthands():
    cfg = load_config({**BASE, "topology": "ring", "mixing": "uniform"})
    assert cfg.topology.name == "ring" and cfg.topology.params == {}
    assert cfg.mixing.scheme == "uniform"
    assert cfg.task.kind == "synthetic"
    assert cfg.total_steps == cfg.rounds * cfg.local_steps


def test_topology_params_sit_beside_name():
    cfg = load_config({**BASE, "topology": {"name": "erdos_renyi", "p": 0.3, "seed": 4}})
    assert cfg.topology.params == {"p": 0.3, "seed": 4}


def test_round_trip_through_dict():
    cfg = load_config({**BASE, "topology": {"name": "grid", "rows": 2}, "optim": {"betas": [0.8, 0.9]}})
    assert load_config(cfg.to_dict()) == cfg


def test_lora_scaling():
    cfg = load_config({**BASE, "lora": {"rank": 4, "alpha": 8}})
    assert cfg.lora.scale == 2.0
    cfg = load_config({**BASE, "lora": {"rank": 4, "alpha": 8, "scaling": "alpha/sqrt(r)"}})
    assert cfg.lora.scale == 4.0


@pytest.mark.parametrize("data, field, words", [
    ({"lora": {"rank": 0}}, "lora.rank", ">= 1"),
    ({"agents": 0}, "agents", ">= 1"),
    ({"algorithm": "decaff"}, "algorithm", "valid: decaf, dlora"),
    ({"lora": {"rnak": 2}}, "lora.rnak", "unknown key"),
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"rounds": "ten"}, "rounds", "expected an integer"),
    ({"rounds": 2.5}, "rounds", "expected an integer"),
    ({"optim": {"lr": -1}}, "optim.lr", "> 0"),
    ({"optim": {"name": "lbfgs"}}, "optim.name", "valid: sgd, momentum, adam, adamw"),
    ({"data": {"partition": "pathological"}}, "data.partition", "valid: iid"),
    ({"task": {"kind": "imagenet"}}, "task.kind", "valid: synthetic"),
    ({"task": {"kind": "synthetic", "true_rank": 0}}, "task.true_rank", ""),
    ({"mixing": {"scheme": "matrix"}}, "mixing.matrix", "give a matrix"),
    ({"optim": {"betas": [0.9]}}, "optim.betas", "list of 2"),
    ({"lora": {"alpha": True}}, "lora.alpha", "expected a number"),
    ({"lora": {"alpha": "big"}}, "lora.alpha", "expected a number"),
    ({"grad_norm": "yes"}, "grad_norm", "true or false"),
    ({"runtime": {"batch_agents": 4, "agents_per_host": 2}}, "runtime.batch_agents",
     "between 1 and agents_per_host (2)"),
    # per-agent LoRA ranks
    ({"algorithm": "dlora", "lora": {"ranks": [2] * 10}}, "lora.ranks",
     "dlora averages factors of one shape; agents of different ranks need one of decaf, "),
    ({"algorithm": "fedavg", "lora": {"rank_rule": "neighbourhood"}}, "lora.rank_rule",
     "decaf, hetlora, flora, local, local_fa"),
    ({"algorithm": "centralized", "lora": {"rank_rule": "neighbourhood"}}, "lora.rank_rule",
     "trains one agent"),
    ({"algorithm": "hetlora", "agents": 3, "lora": {"ranks": [1, 2]}}, "lora.ranks",
     "2 given for 3 agents"),
    ({"lora": {"ranks": [1, 0]}}, "lora.ranks", "integers >= 1"),
    ({"lora": {"ranks": [1, 2], "rank_rule": "neighbourhood"}}, "lora.ranks", "not both"),
    ({"lora": {"rank_max": 3}}, "lora.rank_max", "only rank_rule neighbourhood"),
    ({"lora": {"rank_rule": "degree"}}, "lora.rank_rule", "valid: uniform, neighbourhood"),
    ({"task": {"kind": "causal_lm"}, "agents": 2, "lora": {"ranks": [1, 2]}}, "lora.ranks",
     "task kind causal_lm builds one LoRA rank"),
])
def test_bad_values_name_the_field(data, field, words):
    with pytest.raises(ConfigError) as e:
        load_config({**BASE, **data})
    assert e.value.field == field
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_task_is_required():
    with pytest.raises(ConfigError, match="task"):
        load_config({})


def test_overrides_parse_yaml_values():
    data = apply_override({"lora": {"rank": 2}}, "lora.rank=8")
    assert data == {"lora": {"rank": 8}}
    data = apply_override({"topology": "ring"}, "topology.name=star")
    assert data == {"topology": {"name": "star"}}
    cfg = load_config({**BASE}, ["optim.lr=1e-4", "algorithm=dlora", "data.shots=null"])
    assert cfg.optim.lr == 1e-4 and cfg.algorithm == "dlora" and cfg.data.shots is None
    with pytest.raises(ConfigError, match="--set"):
        apply_override({}, "novalue")


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_yaml_loader_is_safe(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("task: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_the_neighbourhood_rank_rule():
    from decaf_ray.config import LoRAConfig

    # m_i = |N_b(i)|, mean 13/5: r_i = floor(2 m_i / 2.6 + 1/2), capped by rank_max or min(d, k)
    assert LoRAConfig(rank=2, rank_rule="neighbourhood").agent_ranks([5, 2, 2, 2, 2], 6) == \
        (4, 2, 2, 2, 2)
    assert LoRAConfig(rank=2, rank_rule="neighbourhood", rank_max=3).agent_ranks(
        [5, 2, 2, 2, 2], 6) == (3, 2, 2, 2, 2)
    assert LoRAConfig(rank=1, rank_rule="neighbourhood").agent_ranks([9, 2, 2, 2, 2], 8) == \
        (3, 1, 1, 1, 1)  # never below 1
    assert LoRAConfig(rank=3, rank_rule="neighbourhood").agent_ranks([3] * 4, 8) == (3,) * 4
    assert LoRAConfig(rank=3).agent_ranks([5, 2], 8) == (3, 3)
    assert LoRAConfig(ranks=[1, 4]).agent_ranks([5, 2], 8) == (1, 4)


def test_per_agent_ranks_above_the_weights_rank_fail_when_the_plan_is_made():
    from decaf_ray.plan import prepare

    cfg = load_config({"task": {"kind": "synthetic", "d": 4, "k": 8}, "algorithm": "decaf",
                       "agents": 2, "lora": {"ranks": [1, 5]}})
    with pytest.raises(ConfigError, match="lora.ranks: 5 exceeds min"):
        prepare(cfg)
