"""The vLLM backend (optional extra, GPU): one ``LoRARequest`` per adapter; vLLM is imported only when
this backend is chosen, since it is an optional dependency."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ...errors import UnsupportedError
from .base import Backend, Generation


class VLLMBackend(Backend):
    """vLLM engine with LoRA enabled; one ``LoRARequest`` per adapter (base: no request).
    Install with ``pip install 'safeprune[vllm]'`` on a machine with a supported GPU."""

    name = "vllm"

    def __init__(
        self,
        base: str,
        adapters: dict[str, str] | None = None,
        *,
        max_lora_rank: int | None = None,
        dtype: str = "float32",
        **engine_kwargs: Any,
    ):
        super().__init__(base, adapters)
        try:
            from vllm import LLM  # noqa: F401
            from vllm.lora.request import LoRARequest  # noqa: F401
        except ImportError:
            raise UnsupportedError("the vllm backend needs the optional extra: pip install 'safeprune[vllm]'") from None
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        ranks = []
        for path in self.adapters.values():
            cfg = json.loads((Path(path) / "adapter_config.json").read_text())
            ranks.append(max([int(cfg.get("r", 8))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]))
        self.llm = LLM(
            model=self.base,
            enable_lora=bool(self.adapters),
            max_lora_rank=max_lora_rank or max(ranks + [16]),
            max_loras=max(1, len(self.adapters)),
            dtype=dtype,
            **engine_kwargs,
        )
        self.requests = {
            n: LoRARequest(n, i + 1, str(Path(p).resolve())) for i, (n, p) in enumerate(self.adapters.items())
        }
        self.tokenizer = self.llm.get_tokenizer()
        self._hash: str | None = None

    def add_adapter(self, name: str, path: str | Path) -> None:
        if name in self.adapters:
            return super().add_adapter(name, path)
        if not self.requests:
            raise UnsupportedError(
                "the vllm engine was started without LoRA; start it with at least one adapter to add more"
            )
        from vllm.lora.request import LoRARequest

        self.adapters[name] = str(path)
        self.requests[name] = LoRARequest(name, len(self.requests) + 1, str(Path(path).resolve()))

    def render(self, prompt, settings):
        msgs = ([{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        if settings.chat_template and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return prompt

    def generate(self, prompts, adapter, settings, on_batch=None):
        from vllm import SamplingParams

        sp = SamplingParams(
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature if settings.do_sample else 0.0,
            top_p=settings.top_p if settings.do_sample else 1.0,
            seed=settings.seed,
            logprobs=1,
        )
        texts = [self.render(p, settings) for p in prompts]
        t0 = time.perf_counter()
        res = self.llm.generate(texts, sp, lora_request=self.requests.get(adapter) if adapter else None)
        dt = time.perf_counter() - t0
        out = []
        for r in res:
            o = r.outputs[0]
            lps = []
            for tok, d in zip(o.token_ids, o.logprobs or []):
                if d and tok in d:
                    lps.append(d[tok].logprob)
            nll = -sum(lps) / len(lps) if lps else None
            out.append(
                Generation(o.text.strip(), len(o.token_ids), dt, len(texts), nll, None, o.finish_reason == "stop")
            )
        if on_batch:
            on_batch(list(range(len(out))), out)
        return out
