"""CLIP few-shot classification with LoRA on both encoders: the CLIP-LoRA recipe the paper follows.

The model is an open_clip CLIP: a named architecture with a ``pretrained`` tag (``ViT-B-16`` +
``openai``, the paper's; downloaded by open_clip), a local ``checkpoint`` (safetensors, or a
``torch.load(weights_only=True)`` file), or a custom ``model_config`` dict in open_clip's format
(random init from ``init_seed`` unless a checkpoint is given). Every adapted attention block's
fused ``nn.MultiheadAttention`` is replaced by ``SplitAttention``, the same computation with
separate ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` linears, so q, k and v get separate
LoRA adapters (CLIP-LoRA; ViT-B/16 on both encoders: 92,160 trainable parameters per unit of rank).
LoRA comes from peft (``decaf_ray.tasks.peft_lora``).

The classifier is the cosine similarity between the image features and the text features of
``prompt.format(class_name)`` per class, times ``logit_scale``, under cross-entropy. The text
features are recomputed, with gradients, at every step because the text LoRA changes them.

Modules, one concern each:
    config      ``CLIPConfig``, the ``task:`` section, and the LoRA target names
    attention   ``SplitAttention``
    model       building open_clip, splitting attention and injecting LoRA, weights, tokenizer
    classifier  the cosine logits and the evaluation loop (shared with ``decaf_ray.pretrain``)
    task        ``CLIPTask`` (``build``): data, the step, the batched step, evaluation
The data are ``decaf_ray.tasks.image_data``; several agents in one pass,
``decaf_ray.tasks.stacked_lora``.
"""

from decaf_ray.tasks.clip.attention import SplitAttention
from decaf_ray.tasks.clip.config import ENCODERS, TARGETS, CLIPConfig
from decaf_ray.tasks.clip.model import adapt, architecture, base_model, instantiate
from decaf_ray.tasks.clip.task import CLIPTask, build

__all__ = ["CLIPConfig", "CLIPTask", "build", "SplitAttention", "adapt", "base_model",
           "architecture", "instantiate", "TARGETS", "ENCODERS"]
