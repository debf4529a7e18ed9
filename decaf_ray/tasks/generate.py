"""Batched greedy generation from a transformers (or peft) causal LM: the benchmarks' answers and
a local judge's verdicts.

Prompts go in batches of similar length (fewer pad tokens), left-padded so every prompt ends at
the last position, under ``step_rng(seed)`` (greedy draws nothing, but a model that samples or
keeps dropout on would, and its numbers must not depend on what ran before). Each answer stops
at the end-of-sequence token or ``max_new_tokens``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from decaf_ray.tasks.step_rng import step_rng


@torch.no_grad()
def greedy(model, prompts: Sequence[list[int]], *, pad_id: int, eos_id: int | None,
           max_new_tokens: int, batch_size: int, device: torch.device, seed: int = 0,
           desc: str = "generate") -> list[list[int]]:
    """The new token ids of each prompt's greedy continuation, in the prompts' order.

    Args:
        model: a causal LM with ``generate`` (transformers' or peft's), set to eval here.
        prompts: token ids per prompt, each non-empty.
        pad_id, eos_id: the tokenizer's pad and end-of-sequence ids (eos None: never stops early).
        max_new_tokens: the cap on each answer's length.
        batch_size: prompts per ``generate`` call.
    A progress bar over batches shows on a terminal (``desc``); it is off in logs.
    """
    model.eval()
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    out: list[list[int]] = [[] for _ in prompts]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    with step_rng(seed, device):
        for rows in tqdm(batches, desc=desc, disable=None, leave=False):
            width = max(len(prompts[r]) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for k, r in enumerate(rows):
                ids[k, width - len(prompts[r]):] = torch.as_tensor(prompts[r])
                mask[k, width - len(prompts[r]):] = 1
            new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad_id, eos_token_id=eos_id)[:, width:].cpu()
            for k, r in enumerate(rows):
                tokens = new[k].tolist()
                if eos_id is not None and eos_id in tokens:
                    tokens = tokens[:tokens.index(eos_id)]
                out[r] = tokens
    return out
