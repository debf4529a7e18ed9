"""The instruct task (generative instruction tuning, the paper's Table 5) and its judge, with tiny
Llama models built from config, the Alpaca/Dolly/benchmark rows in tests/data/instruct, and a
real OpenAI-compatible server on the loopback address (tests/judge_server.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from decaf_ray import judge
from decaf_ray.config import ConfigError, LoRAConfig, from_dict
from decaf_ray.experiment import run
from decaf_ray.experiment_config import load_config
from decaf_ray.results import RunWriter
from decaf_ray.tasks import instruct_data as idata
from decaf_ray.tasks.instruct import InstructConfig, build
from judge_server import JudgeServer, write_chat_model

DATA = Path(__file__).parent / "data" / "instruct"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
LORA = LoRAConfig(rank=2, alpha=4.0)


def task_cfg(**over) -> dict:
    cfg = {"model_config": TINY, "train_file": str(DATA / "alpaca_en_demo.json"),
           "max_length": 96, "eval_dir": str(DATA), "max_new_tokens": 6, "micro_batch": 3}
    return {**cfg, **over}


def make(**over):
    return build(from_dict(InstructConfig, task_cfg(**over)), LORA, 0)


def adapter(task, scale: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(2, k, generator=g) * scale, torch.randn(d, 2, generator=g) * scale)
            for n, (d, k) in task.lora_shapes().items()}


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    texts = [r["instruction"] + " " + r["output"] for r in json.loads(
        (DATA / "alpaca_en_demo.json").read_text())]
    texts += [l for l in (DATA / "judge_prompts.jsonl").read_text().splitlines()]
    texts += (DATA / "mt_bench_question.jsonl").read_text().splitlines()
    return write_chat_model(tmp_path_factory.mktemp("chat"), texts)


# ------------------------------------------------------------------ config and data


@pytest.mark.parametrize("over, field", [
    ({"tokenizer": "words"}, "tokenizer"),
    ({"benchmarks": ["mmlu"]}, "benchmarks"),
    ({"eval_dir": None}, "eval_dir"),
    ({"split_by": "topic"}, "split_by"),
    ({"judge": {"url": "localhost:8000"}}, "judge.url"),
])
def test_bad_config_names_the_field(over, field):
    with pytest.raises(ConfigError) as e:
        from_dict(InstructConfig, task_cfg(**over))
    assert e.value.field == field


def test_records_read_from_json_and_jsonl_and_a_bad_file_names_itself(tmp_path):
    rows = idata.read_records(DATA / "alpaca_en_demo.json")
    assert len(rows) == 24 and any(r.input for r in rows) and all(r.output for r in rows)
    dolly = idata.read_records(DATA / "dolly.jsonl")
    assert len(dolly) == 16 and all(r.category for r in dolly)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1: needs a string 'output'"):
        make(train_file=str(bad))


def test_split_labels_by_category_and_by_seeded_clusters():
    task = make(train_file=str(DATA / "dolly.jsonl"), split_by="category")
    assert task.num_classes == 4 and sorted(np.bincount(task.train_labels)) == [3, 4, 4, 4]
    rows = idata.read_records(DATA / "alpaca_en_demo.json")
    a = idata.split_labels(rows, "clusters", 3, seed=1)
    assert np.array_equal(a, idata.split_labels(rows, "clusters", 3, seed=1))
    assert set(a.tolist()) == {0, 1, 2}
    with pytest.raises(ConfigError, match="no 'category'"):
        idata.split_labels(rows, "category", 3, 0)


def test_truncation_keeps_the_prompts_head_and_tail_and_the_response_start():
    prompt, response = list(range(100, 180)), list(range(200, 260))
    ids, n = idata.example(prompt, response, eos=2, max_length=64)
    assert len(ids) == 64 and n == 32
    assert ids[:16] == prompt[:16] and ids[16:32] == prompt[-16:]
    assert ids[32:] == response[:32]
    ids, n = idata.example(prompt[:10], response[:5], eos=2, max_length=64)
    assert ids == prompt[:10] + response[:5] + [2] and n == 10


def test_alpaca_template_and_answer_cleaning():
    task = make()
    task.materialize()
    rec = next(r for r in task.train if r.input)
    text = task.codec.decode(task.template.record_prompt(rec))
    assert text.startswith("Below is an instruction that describes a task, paired with an input")
    assert f"### Input:\n{rec.input}\n\n### Response:\n" in text
    two = task.codec.decode(task.template.prompt(["Q one", "Q two"], ["A one"]))
    assert two.endswith("### Response:\nA one\n\n### Instruction:\nQ two\n\n### Response:\n")
    assert task.template.clean(" Sure.\n### Instruction:\nmore") == "Sure."


# ------------------------------------------------------------------ loss and evaluation


def test_the_loss_is_the_mean_nll_of_response_tokens_whatever_the_padding():
    """The batched, padded, micro-batched loss equals one-example-at-a-time sums of the
    response tokens' NLL (prompt tokens and padding never count)."""
    task = make(micro_batch=2)
    factors = adapter(task)
    idx = np.array([0, 3, 5, 7, 11])
    loss, grads = task.loss_and_grads(factors, idx, True, seed=3)
    task.model.eval()  # no dropout in the reference (LoRA dropout 0 here anyway)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in idx:
            ids, n = task.example(0, i)
            logits = task.model(input_ids=torch.tensor([ids])).logits[0, :-1]
            logp = torch.log_softmax(logits.float(), -1)
            target = torch.tensor(ids[1:])
            nll = -logp[torch.arange(len(ids) - 1), target][n - 1:]
            total, count = total + float(nll.sum()), count + len(nll)
    assert count == task.loss_weight(idx)
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert all(ga is not None and gb.abs().sum() > 0 for ga, gb in grads.values())
    again = task.loss_and_grads(factors, idx, True, seed=3)
    assert again[0] == loss


def test_evaluate_reports_held_out_loss_and_perplexity():
    task = make(test_samples=None, test_fraction=0.2)
    m = task.evaluate(adapter(task))
    assert set(m) == {"test_loss", "test_perplexity"}
    assert m["test_perplexity"] == pytest.approx(math.exp(m["test_loss"]))


def test_final_evaluation_answers_every_benchmark_turn_and_counts_refusals():
    task = make(bench_samples=2, refusal_prefixes=["I cannot"])
    factors = adapter(task)
    out = task.evaluate_final(factors, agent=0)
    gens = out["generations"]
    assert sorted({g["benchmark"] for g in gens}) == ["advbench", "mt_bench", "vicuna"]
    assert len(gens) == 6
    assert all(len(g["answers"]) == len(g["turns"]) for g in gens)
    assert any(len(g["turns"]) == 2 for g in gens)  # MT-Bench's second turn was answered
    adv = [g for g in gens if g["benchmark"] == "advbench"]
    assert out["advbench_refusal_rate"] == np.mean([g["refused"] for g in adv])
    import decaf_ray.tasks.instruct as instruct_module

    calls = []
    real = instruct_module.greedy
    instruct_module.greedy = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        again = task.evaluate_final(factors, agent=1)["generations"]
        other = task.evaluate_final(adapter(task, seed=1), agent=2)["generations"]
    finally:
        instruct_module.greedy = real
    assert again == gens  # an equal adapter (another agent's copy): the same answers, not redone
    assert len(calls) == 2 and other != gens  # another adapter: its own two turns
    assert "generations" not in make(generate_agents=[1]).evaluate_final(factors, agent=0)


def test_chat_template_from_a_tokenizer_folder(chat_folder):
    task = make(model_config={**TINY, "vocab_size": 2000}, tokenizer=str(chat_folder),
                template="chat")
    task.materialize()
    words = task.codec.tokenizer.decode(task.template.prompt(["hello"])).split()
    assert words[:2] == ["<|im_start|>", "user"] and words[-2:] == ["<|im_start|>", "assistant"]
    with pytest.raises(ConfigError, match="no chat template"):
        make(template="chat").materialize()


# ------------------------------------------------------------------ a run, written


def run_cfg(tmp_path, **task_over):
    return load_config({
        "algorithm": "decaf", "agents": 2, "topology": "complete", "rounds": 6, "local_steps": 2,
        "eval_every": 3, "seed": 0, "grad_norm": False,
        "task": {"kind": "instruct", **task_cfg(bench_samples=1, **task_over)},
        "data": {"partition": "iid", "batch_size": 4},
        "lora": {"rank": 2, "alpha": 4.0}, "optim": {"name": "adam", "lr": 0.02},
        "runtime": {"kind": "inprocess"}})


def test_a_run_trains_its_held_out_loss_down_and_saves_the_generations(tmp_path):
    cfg = run_cfg(tmp_path, generate_agents=[1])
    writer = RunWriter(tmp_path / "run").open(cfg)
    result = run(cfg, on_rows=writer.rows, progress=False)
    writer.close(result)
    net = {(r["round"], r["metric"]): r["value"] for r in result.rows if r["agent"] == -1}
    assert net[(6, "test_loss")] < net[(0, "test_loss")]
    assert (6, "advbench_refusal_rate") in net and (3, "advbench_refusal_rate") not in net
    lines = (tmp_path / "run" / "generations.jsonl").read_text().splitlines()
    gens = [json.loads(l) for l in lines]
    assert len(gens) == 3 and {g["agent"] for g in gens} == {1}
    assert "no task.judge" in result.summary["judge"]


# ------------------------------------------------------------------ the judge


def test_rating_parse_follows_fastchat():
    assert judge.parse_rating("Rating: [[7]]") == 7.0
    assert judge.parse_rating("I give it [8.5].") == 8.5
    assert judge.parse_rating("no rating here") is None


def test_math_questions_with_a_reference_get_the_math_prompts():
    prompts = judge.load_prompts(DATA / "judge_prompts.jsonl")
    q = [json.loads(l) for l in (DATA / "mt_bench_question.jsonl").read_text().splitlines()]
    math_q = next(x for x in q if x["category"] == "math")
    rec = {"category": "math", "turns": math_q["turns"], "answers": ["a1", "a2"],
           "reference": math_q["reference"]}
    (s1, u1), (s2, u2) = judge.judge_prompts(rec, prompts)
    assert "[The Start of Reference Answer]" in u1 and math_q["reference"][0] in u1
    assert "<|The Start of Reference Answer|>" in u2 and "a2" in u2
    plain = judge.judge_prompts({**rec, "category": "writing"}, prompts)
    assert "Reference" not in plain[0][1]


def test_the_endpoint_judge_scores_through_a_real_local_server(tmp_path, chat_folder,
                                                               monkeypatch):
    """The whole judge path against a real HTTP server serving a real (tiny, random) model:
    the pre-run check, one request per turn with the API key, verdicts saved, and a verdict
    without a rating counted as unscored rather than given a number."""
    monkeypatch.setenv("DECAF_TEST_JUDGE_KEY", "sk-test")
    server = JudgeServer(chat_folder)
    with server as url:
        cfg = run_cfg(tmp_path, benchmarks=["mt_bench", "vicuna"], judge={
            "url": url, "model": "tiny", "api_key_env": "DECAF_TEST_JUDGE_KEY",
            "max_tokens": 8, "retries": 0})
        judge.check(cfg)
        result = run(cfg, progress=False)
    posts = [r for r in server.requests if r[0] == "/v1/chat/completions"]
    gens = result.generations
    assert len(posts) == sum(len(g["turns"]) for g in gens) == 2 * (2 + 1)  # 2 agents x (MT-Bench 2 turns + Vicuna 1)
    assert all(auth == "Bearer sk-test" for _, auth in server.requests)
    assert all(len(g["judgments"]) == len(g["turns"]) for g in gens)
    final = {(r["agent"], r["metric"]): r["value"] for r in result.rows if r["round"] == 6}
    scored = [j["score"] for g in gens for j in g["judgments"]]
    assert final[(-1, "mt_bench_unscored")] == sum(
        s is None for g in gens if g["agent"] == 0 and g["benchmark"] == "mt_bench"
        for s in [j["score"] for j in g["judgments"]])
    if all(s is None for s in scored):
        assert math.isnan(final[(0, "mt_bench_score")])
    assert result.summary["judge"] == "tiny"


def test_a_judge_without_its_key_or_server_stops_the_run_before_training(tmp_path,
                                                                        monkeypatch):
    monkeypatch.delenv("DECAF_TEST_JUDGE_KEY", raising=False)
    cfg = run_cfg(tmp_path, judge={"url": "http://127.0.0.1:9/v1",
                                   "api_key_env": "DECAF_TEST_JUDGE_KEY"})
    with pytest.raises(ConfigError, match="DECAF_TEST_JUDGE_KEY is not set"):
        judge.check(cfg)
    cfg = run_cfg(tmp_path, judge={"url": "http://127.0.0.1:9/v1", "api_key_env": None})
    with pytest.raises(ConfigError, match="does not answer") as e:
        judge.check(cfg)
    assert e.value.field == "task.judge.url"


def test_a_local_transformers_judge(chat_folder, tmp_path):
    cfg = run_cfg(tmp_path, benchmarks=["vicuna"], judge={"kind": "local",
                                                           "model": str(chat_folder),
                                                           "max_tokens": 4})
    ask = judge.make_judge(cfg.task.judge)
    text = ask("You are a judge.", "Rate this answer.")
    assert isinstance(text, str)


@pytest.mark.ray
def test_ray_hosts_send_their_generations_back_with_the_inprocess_numbers(ray_session, tmp_path):
    """Each host answers the benchmarks for its own agents; the answers and metrics reach the
    driver whole and equal to the in-process run's."""
    cfg = run_cfg(tmp_path)
    ref = run(cfg, progress=False)
    over = cfg.to_dict()
    over["runtime"] = {"kind": "ray", "agents_per_host": 1, "threads": 1}
    got = run(load_config(over), progress=False)
    values = lambda res: [(r["round"], r["agent"], r["metric"], r["value"]) for r in res.rows]
    assert values(got) == values(ref)
    assert got.generations == ref.generations and {g["agent"] for g in got.generations} == {0, 1}


def test_category_labels_feed_the_non_iid_partitions(tmp_path):
    from decaf_ray.plan import prepare

    over = {"train_file": str(DATA / "dolly.jsonl"), "split_by": "category", "benchmarks": []}
    cfg = load_config({**run_cfg(tmp_path).to_dict(),
                       "task": {"kind": "instruct", **task_cfg(**over)},
                       "data": {"partition": "classes_per_agent", "classes_per_agent": 2,
                                "batch_size": 2}})
    plan = prepare(cfg)
    labels = plan.task.train_labels
    held = [sorted(set(labels[s].tolist())) for s in plan.shards]
    assert all(len(h) <= 2 for h in held) and held[0] != held[1]


def test_a_model_folder_loads_with_its_own_tokenizer(chat_folder):
    task = make(model=str(chat_folder), model_config=None, template="chat")
    loss, grads = task.loss_and_grads(adapter(task), np.arange(4), True, seed=0)
    assert math.isfinite(loss) and task.codec.eos_id == task.codec.tokenizer.eos_token_id


def test_left_padded_batches_answer_as_one_prompt_at_a_time():
    """Greedy answers do not depend on the batch a prompt shares (padding and positions are
    right), so every agent's answers are comparable whatever generate_batch is."""
    from decaf_ray.tasks import peft_lora as pl
    from decaf_ray.tasks.generate import greedy

    task = make()
    task.materialize()
    pl.set_factors(task.layers, adapter(task, scale=0.5))
    prompts = [task.template.prompt([t]) for t in ("Hi", "Name three colours of the rainbow.",
                                                   "Why is the sky blue? Explain briefly.", "Ok")]
    kw = dict(pad_id=task.codec.pad_id, eos_id=task.codec.eos_id, max_new_tokens=8,
              device=task.device)
    assert greedy(task.model, prompts, batch_size=4, **kw) == \
        [greedy(task.model, [p], batch_size=1, **kw)[0] for p in prompts]


def test_the_endpoint_judge_retries_an_overloaded_server_and_reports_a_dead_one(chat_folder,
                                                                                tmp_path):
    server = JudgeServer(chat_folder, fail_first=1)
    with server as url:
        cfg = run_cfg(tmp_path, judge={"url": url, "model": "tiny", "api_key_env": None,
                                       "max_tokens": 4, "retries": 1})
        assert isinstance(judge.make_judge(cfg.task.judge)("sys", "user"), str)
    assert [p for p, _ in server.requests].count("/v1/chat/completions") == 2
    dead = JudgeServer(chat_folder, fail_first=5)
    with dead as url:
        cfg = run_cfg(tmp_path, judge={"url": url, "model": "tiny", "api_key_env": None,
                                       "retries": 0})
        with pytest.raises(ValueError, match="HTTP 503"):
            judge.make_judge(cfg.task.judge)("sys", "user")
        from decaf_ray.plan import RunResult

        rows = [{"round": 6, "step": 12, "agent": -1, "metric": "test_loss", "value": 1.0}]
        gens = [{"agent": 0, "benchmark": "vicuna", "question_id": "1", "category": "generic",
                 "turns": ["q"], "answers": ["a"]}]
        result = judge.judge_result(cfg, RunResult(cfg, "completed", list(rows), {"final": {}},
                                                   {}, gens))
    assert result.summary["judge"].startswith("failed: ValueError") and result.rows == rows
