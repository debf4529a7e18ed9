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
