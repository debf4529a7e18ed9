"""For the tests: a tiny chat tokenizer and model written to a folder, and a real OpenAI-compatible
HTTP server (``/v1/models``, ``/v1/chat/completions``) serving such a model on the loopback
address, as a vLLM or llama.cpp server would serve a judge. Its verdicts are a random model's:
the tests check the pipeline, never a score."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<unk>", "<|im_start|>"]


def write_chat_model(folder: Path, texts: list[str]) -> Path:
    """A word-level tokenizer of ``texts`` with a ChatML template, and a random 2-layer Llama
    sized for it, saved in ``folder`` (``from_pretrained`` loads both)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)} | {"[", "]", "5"})
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32,
                                             intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=4096))
    model.save_pretrained(folder)
    return folder


class JudgeServer:
    """``with JudgeServer(folder) as url:`` serves the model in ``folder`` at ``url`` (``.../v1``);
    ``requests`` keeps each request's path and Authorization header; the first ``fail_first``
    completions answer 503, as an overloaded server does."""

    def __init__(self, folder: Path, max_tokens: int = 12, fail_first: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.max_tokens, self.requests, self.fail_first = max_tokens, [], fail_first
        self.lock = threading.Lock()

    def complete(self, body: dict) -> str:
        import torch

        ids = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True,
                                                 tokenize=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with self.lock, torch.no_grad():
            out = self.model.generate(ids[:, -512:], do_sample=False,
                                      max_new_tokens=min(body.get("max_tokens", 16), self.max_tokens),
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, ids[:, -512:].shape[1]:], skip_special_tokens=True)

    def __enter__(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, data: dict) -> None:
                raw = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Authorization")))
                if self.path == "/v1/models":
                    return self._reply(200, {"object": "list", "data": [{"id": "tiny"}]})
                self._reply(404, {"error": "not found"})

            def do_POST(self):
                server.requests.append((self.path, self.headers.get("Authorization")))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._reply(404, {"error": "not found"})
                if server.fail_first > 0:
                    server.fail_first -= 1
                    return self._reply(503, {"error": "overloaded"})
                text = server.complete(body)
                self._reply(200, {"object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "length",
                                               "message": {"role": "assistant", "content": text}}]})

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
