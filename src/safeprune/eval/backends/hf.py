"""The transformers backend (the default): greedy continuous batching (or HF ``generate``) with PEFT
adapters on one loaded base.

A backend loads the base model once and generates for several *variants* of it: ``None`` is the base
itself (PEFT adapters disabled) and every other name is a LoRA adapter attached to the same loaded base
(``PeftModel.load_adapter`` + ``set_adapter``; adapters stay unmerged, so the latency is the latency
users get with a served LoRA).

Each :class:`Generation` carries the text, the number of new tokens, the wall time of the batch it was
in (continuous batching: the time attributed to it), and two uncertainty scores of the generated tokens under the model's own next-token distribution:
the mean negative log-likelihood (``mean_nll``) and the mean entropy (``mean_entropy``), both over the
tokens up to and including the first end-of-sequence token. AUARC uses ``mean_nll`` by default.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList, StoppingCriteriaList

from ...errors import InputError, UsageError
from ...io.devices import resolve_device
from ...weights.resolve import resolve_model
from .base import CALL_ROWS, Backend, Generation, GenSettings
from .continuous import auto_rows, cache_kwarg, continuous_generate
from .stopping import KeywordStoppingCriteria, SubstringStop

# "continuous": safeprune's own greedy loop (continuous batching over the KV cache, see continuous.py);
# "generate": HF generate on fixed batches (sampling always uses it)
LOOPS = ("continuous", "generate")


class _TokenStats:
    """A logits processor that records, per step, the entropy of the next-token distribution and its
    log-probabilities, and on the next step reads off the log-probability of the token that was chosen
    (it is the last column of ``input_ids``). Memory: one batch × vocab row at a time."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.prev_logp = None
        self.chosen_logp: list[Any] = []
        self.entropy: list[Any] = []

    def __call__(self, input_ids, scores):
        if self.prev_logp is not None:
            tok = input_ids[:, -1:]
            self.chosen_logp.append(self.prev_logp.gather(1, tok).squeeze(1))
        logp = torch.log_softmax(scores.float(), dim=-1)
        p = logp.exp()
        self.entropy.append(-(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1))
        self.prev_logp = logp
        return scores

    def finish(self, sequences):
        if self.prev_logp is not None and sequences.shape[1] > self.prompt_len + len(self.chosen_logp):
            tok = sequences[:, self.prompt_len + len(self.chosen_logp)].unsqueeze(1)
            self.chosen_logp.append(self.prev_logp.gather(1, tok).squeeze(1))
        self.prev_logp = None


class HFBackend(Backend):
    """Greedy generation by continuous batching (``loop="continuous"``, the default) or transformers
    ``generate`` on fixed left-padded batches (``loop="generate"``, and every sampled generation); chat
    template applied; PEFT adapters attached to one loaded base and switched with ``set_adapter``; the base
    alone through ``disable_adapter()``."""

    name = "hf"

    def __init__(
        self,
        base: str,
        adapters: dict[str, str] | None = None,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = None,
        loop: str = "continuous",
    ):
        super().__init__(base, adapters)
        if loop not in LOOPS:
            raise UsageError(f"unknown generation loop {loop!r}; known: {', '.join(LOOPS)}")
        self.loop = loop
        self.device = str(resolve_device(device))  # auto: a CUDA GPU if there is one; bad names: one line
        if threads:
            torch.set_num_threads(threads)
        ref = resolve_model(base)  # HF directory, sharded, .safetensors in one, .gguf, hub id from the cache
        bp, kw = ref.directory, ref.kwargs()
        self.base = str(ref.path)  # what the generation cache's model hash reads
        self.dtype = dtype
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(bp, local_files_only=True, **kw)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise InputError(
                f"cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})", bp
            ) from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(bp, dtype=getattr(torch, dtype), local_files_only=True, **kw)
        model.to(self.device).eval()
        self._has_peft = False
        for i, (name, path) in enumerate(self.adapters.items()):
            ap = Path(path)
            if not (ap / "adapter_config.json").is_file():
                raise InputError("not a PEFT adapter directory (no adapter_config.json)", ap)
            try:
                if i == 0:
                    model = PeftModel.from_pretrained(model, str(ap), adapter_name=name, is_trainable=False)
                else:
                    model.load_adapter(str(ap), adapter_name=name, is_trainable=False)
            except Exception as e:  # noqa: BLE001
                raise InputError(
                    f"PEFT could not load the adapter on {bp} ({type(e).__name__}: {str(e).splitlines()[0][:200]})", ap
                ) from None
            self._has_peft = True
        self.model = model.eval()
        self._hash: str | None = None

    def add_adapter(self, name: str, path: str | Path) -> None:
        if name in self.adapters:
            return super().add_adapter(name, path)  # same path: no-op; another path: UsageError
        ap = Path(path)
        if not (ap / "adapter_config.json").is_file():
            raise InputError("not a PEFT adapter directory (no adapter_config.json)", ap)
        try:
            if not self._has_peft:
                self.model = PeftModel.from_pretrained(
                    self.model, str(ap), adapter_name=name, is_trainable=False
                ).eval()
                self._has_peft = True
            else:
                self.model.load_adapter(str(ap), adapter_name=name, is_trainable=False)
        except Exception as e:  # noqa: BLE001
            raise InputError(
                f"PEFT could not load the adapter on {self.base} ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                ap,
            ) from None
        self.adapters[name] = str(path)

    def render(self, prompt: str, settings: GenSettings) -> str:
        if not settings.chat_template or not getattr(self.tokenizer, "chat_template", None):
            return prompt
        msgs = ([{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _select(self, adapter: str | None):
        if adapter is None:
            return self.model.disable_adapter() if self._has_peft else contextlib.nullcontext()
        if adapter not in self.adapters:
            raise UsageError(f"unknown adapter {adapter!r} (loaded: {', '.join(self.adapters) or 'none'})")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    @property
    def cache_kwarg(self) -> str | None:
        """How the model takes its KV cache in ``forward`` (None: continuous batching cannot run here)."""
        if not hasattr(self, "_cache_kwarg"):
            self._cache_kwarg = cache_kwarg(self.model)
        return self._cache_kwarg

    def schedules_itself(self, settings: GenSettings) -> bool:
        return self.loop == "continuous" and not settings.do_sample and self.cache_kwarg is not None

    def generate(self, prompts, adapter, settings, on_batch=None):
        texts = [self.render(p, settings) for p in prompts]
        with self._select(adapter), torch.inference_mode():
            if self.schedules_itself(settings):
                return continuous_generate(self, texts, settings, on_batch)
            return self._generate_batches(texts, settings, on_batch)

    def encode_kwargs(self, settings: GenSettings) -> dict[str, Any]:
        return {"add_special_tokens": not settings.chat_template or not getattr(self.tokenizer, "chat_template", None)}

    def stopper(self, settings: GenSettings) -> SubstringStop | None:
        if not settings.stop_strings and not settings.stop_patterns:
            return None
        return SubstringStop(
            self.tokenizer, settings.stop_strings, settings.stop_case_sensitive, self.eos_ids(), settings.stop_patterns
        )

    def _generate_batches(self, texts, settings, on_batch):
        """HF ``generate`` on fixed batches (the path before continuous batching; also every sampled
        generation): a batch runs until its longest row ends."""
        eos_ids = self.eos_ids()
        stop = self.stopper(settings)
        bs = settings.batch_size
        if bs <= 0:  # automatic: memory-bounded (see continuous.auto_rows), at most CALL_ROWS (fixed batches pad)
            longest = max(
                (len(self.tokenizer(t, **self.encode_kwargs(settings))["input_ids"]) for t in texts), default=1
            )
            bs = min(CALL_ROWS, auto_rows(self.model, longest + settings.max_new_tokens, self.device))
        # longest first within the call: less padding per batch; results put back in order
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        results: dict[int, Generation] = {}
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            enc = self.tokenizer(
                [texts[i] for i in idx], return_tensors="pt", padding=True, **self.encode_kwargs(settings)
            ).to(self.device)
            plen = enc["input_ids"].shape[1]
            stats = _TokenStats(plen)
            kw: dict[str, Any] = dict(
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
                pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([stats]),
            )
            crit = KeywordStoppingCriteria(stop, plen, len(idx)) if stop else None
            if crit:
                kw["stopping_criteria"] = StoppingCriteriaList([crit])
            if settings.do_sample:
                torch.manual_seed(settings.seed + s)
                kw.update(temperature=settings.temperature, top_p=settings.top_p)
            else:
                kw.update(temperature=None, top_p=None, top_k=None)
            t0 = time.perf_counter()
            seq = self.model.generate(**enc, **kw)
            dt = time.perf_counter() - t0
            stats.finish(seq)
            new = seq[:, plen:]
            lp = torch.stack(stats.chosen_logp, 1) if stats.chosen_logp else torch.zeros(len(idx), 0)
            ent = torch.stack(stats.entropy, 1) if stats.entropy else torch.zeros(len(idx), 0)
            gens = []
            for j in range(len(idx)):
                toks = new[j].tolist()
                n = len(toks)
                finished = early = False
                cut = crit.stopped_at[j] if crit else None
                for k, t in enumerate(toks[: cut or n]):
                    if t in eos_ids:
                        n, finished = k + 1, True
                        break
                else:
                    if cut is not None:
                        n, early = cut, True
                text = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
                m = min(n, lp.shape[1])
                nll = float(-lp[j, :m].mean()) if m else None
                me = float(ent[j, : min(n, ent.shape[1])].mean()) if n else None
                gens.append(Generation(text.strip(), n, dt, len(idx), nll, me, finished, early))
            for i, g in zip(idx, gens):
                results[i] = g
            if on_batch:
                on_batch(list(idx), gens)
        return [results[i] for i in range(len(texts))]

    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gc = getattr(self.model, "generation_config", None)
        e = getattr(gc, "eos_token_id", None) if gc is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(e)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            device=self.device,
            dtype=self.dtype,
            padding_side="left",
            adapters_merged=False,
            loop=self.loop if self.cache_kwarg is not None else "generate",
        )
        return d
