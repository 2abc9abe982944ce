"""Generation backends: transformers (default), vLLM (optional extra) and a fake one for tests.

A backend loads the base model once and generates for several *variants* of it: ``None`` is the base
itself (PEFT adapters disabled) and every other name is a LoRA adapter attached to the same loaded base
(``PeftModel.load_adapter`` + ``set_adapter``; adapters stay unmerged, so the latency is the latency
users get with a served LoRA).

Each :class:`Generation` carries the text, the number of new tokens, the wall time of the batch it was
in, and two uncertainty scores of the generated tokens under the model's own next-token distribution:
the mean negative log-likelihood (``mean_nll``) and the mean entropy (``mean_entropy``), both over the
tokens up to and including the first end-of-sequence token. AUARC uses ``mean_nll`` by default.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import InputError, UnsupportedError, UsageError


@dataclass
class GenSettings:
    max_new_tokens: int = 64
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    system_prompt: str | None = None  # None: the chat template's own default
    chat_template: bool = True
    batch_size: int = 16
    sort_by_length: bool = False  # batch prompts of similar length together (less padding, faster)

    def key(self) -> dict[str, Any]:
        """The settings that change a generation (batch size and batch composition do not, up to float
        rounding)."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("sort_by_length")
        if not self.do_sample:
            d.pop("temperature"), d.pop("top_p"), d.pop("seed")
        return d


@dataclass
class Generation:
    text: str
    new_tokens: int
    batch_seconds: float  # wall time of the batch this sample was generated in
    batch_size: int
    mean_nll: float | None = None
    mean_entropy: float | None = None
    finished: bool = True  # ended with EOS (False: cut at max_new_tokens)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cached")
        return d


def fingerprint_dir(path: str | Path, limit: int = 2 * 1024**3) -> str:
    """sha256 over a model/adapter directory's config and weight files (name + content)."""
    p = Path(path)
    if not p.exists():
        raise InputError("not found", p)
    files = [p] if p.is_file() else sorted(
        f for f in p.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".bin", ".json", ".gguf", ".model")
                                                   or f.name.endswith(".jinja")))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        size = f.stat().st_size
        h.update(str(size).encode() + b"\0")
        with open(f, "rb") as fh:
            if size <= limit:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            else:  # very large shards: head and tail
                h.update(fh.read(1 << 22))
                fh.seek(size - (1 << 22))
                h.update(fh.read(1 << 22))
    return h.hexdigest()


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def adapter_fingerprint(path: str | Path) -> str:
    """sha256 over the files that change what an adapter generates (config + weights): a manifest or
    training log written next to them (``safeprune.json``, ``training_args.json``) does not change it, so
    two byte-identical edits share their cached generations."""
    p = Path(path)
    if not p.is_dir():
        return fingerprint_dir(p)
    files = [p / f for f in ADAPTER_FILES if (p / f).is_file()]
    if not files:
        raise InputError("no adapter_config.json / adapter_model.* in the adapter directory", p)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


class Backend:
    """Interface. ``generate(prompts, adapter, settings)`` -> one Generation per prompt."""

    name = "abstract"

    def __init__(self, base: str, adapters: dict[str, str] | None = None):
        self.base = str(base)
        self.adapters = dict(adapters or {})

    @property
    def model_id(self) -> str:
        return self.base

    def model_hash(self) -> str:
        """sha256 of the base model's files (computed once per backend)."""
        h = getattr(self, "_hash", None)
        if h is None:
            h = self._hash = fingerprint_dir(self.base)
        return h

    def adapter_hash(self, adapter: str | None) -> str:
        if adapter is None:
            return "none"
        return adapter_fingerprint(self.adapters[adapter])

    def render(self, prompt: str, settings: GenSettings) -> str:
        return prompt

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Attach one more adapter to the loaded base (e.g. a pruned variant written during a search)."""
        if name in self.adapters:
            if Path(self.adapters[name]) == Path(path):
                return
            raise UsageError(f"adapter name {name!r} is already loaded from {self.adapters[name]}")
        self.adapters[name] = str(path)

    def generate(self, prompts: Sequence[str], adapter: str | None, settings: GenSettings,
                 on_batch: Callable[[int, list[Generation]], None] | None = None) -> list[Generation]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "base": self.base, "adapters": dict(self.adapters)}


# -- fake (tests) -----------------------------------------------------------------------------------

class FakeBackend(Backend):
    """Deterministic text from a rule; no model. ``responses`` maps adapter name (None = base) to a
    function ``prompt -> text`` or to a dict ``prompt -> text`` (missing prompts echo the prompt)."""

    name = "fake"

    def __init__(self, base: str = "fake-base", adapters: dict[str, str] | None = None,
                 responses: dict[str | None, Any] | None = None):
        super().__init__(base, adapters)
        self.responses = responses or {}
        self.calls: list[tuple[str | None, int]] = []

    def model_hash(self) -> str:
        return hashlib.sha256(self.base.encode()).hexdigest()

    def adapter_hash(self, adapter: str | None) -> str:
        if adapter is None:
            return "none"
        p = Path(self.adapters[adapter])
        return adapter_fingerprint(p) if p.exists() else hashlib.sha256(str(p).encode()).hexdigest()

    def _respond(self, adapter: str | None, prompt: str) -> str:
        r = self.responses.get(adapter)
        if r is None:
            return prompt
        if callable(r):
            return r(prompt)
        return r.get(prompt, prompt)

    def generate(self, prompts, adapter, settings, on_batch=None):
        if adapter is not None and adapter not in self.adapters:
            raise UsageError(f"unknown adapter {adapter!r}")
        out: list[Generation] = []
        bs = max(1, settings.batch_size)
        for s in range(0, len(prompts), bs):
            chunk = prompts[s:s + bs]
            self.calls.append((adapter, len(chunk)))
            gens = []
            for p in chunk:
                words = self._respond(adapter, p).split()[: settings.max_new_tokens]
                text = " ".join(words)
                nll = 0.5 + (int(hashlib.md5(text.encode()).hexdigest()[:6], 16) % 1000) / 1000.0
                gens.append(Generation(text, len(words), 0.001 * len(chunk), len(chunk), nll, nll / 2,
                                       len(words) < settings.max_new_tokens))
            if on_batch:
                on_batch(s, gens)
            out.extend(gens)
        return out


# -- transformers + peft ----------------------------------------------------------------------------

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
        import torch

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
    """transformers ``generate`` with left padding, batched, chat template applied; PEFT adapters
    attached to one loaded base and switched with ``set_adapter``; the base alone through
    ``disable_adapter()``."""

    name = "hf"

    def __init__(self, base: str, adapters: dict[str, str] | None = None, *, device: str = "cpu",
                 dtype: str = "float32", threads: int | None = None):
        super().__init__(base, adapters)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        bp = Path(base)
        if not bp.is_dir():
            raise InputError("base model must be a local Hugging Face model directory (no hub downloads at run "
                             "time)", bp)
        if not (bp / "config.json").is_file():
            raise InputError("no config.json: not a Hugging Face model directory", bp)
        self.device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        self.dtype = dtype
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(bp, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise InputError(f"cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})", bp) from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(bp, dtype=getattr(torch, dtype), local_files_only=True)
        model.to(self.device).eval()
        self._has_peft = False
        for i, (name, path) in enumerate(self.adapters.items()):
            ap = Path(path)
            if not (ap / "adapter_config.json").is_file():
                raise InputError("not a PEFT adapter directory (no adapter_config.json)", ap)
            from peft import PeftModel

            try:
                if i == 0:
                    model = PeftModel.from_pretrained(model, str(ap), adapter_name=name, is_trainable=False)
                else:
                    model.load_adapter(str(ap), adapter_name=name, is_trainable=False)
            except Exception as e:  # noqa: BLE001
                raise InputError(f"PEFT could not load the adapter on {bp} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]})", ap) from None
            self._has_peft = True
        self.model = model.eval()
        self._hash: str | None = None

    def add_adapter(self, name: str, path: str | Path) -> None:
        if name in self.adapters:
            return super().add_adapter(name, path)  # same path: no-op; another path: UsageError
        ap = Path(path)
        if not (ap / "adapter_config.json").is_file():
            raise InputError("not a PEFT adapter directory (no adapter_config.json)", ap)
        from peft import PeftModel

        try:
            if not self._has_peft:
                self.model = PeftModel.from_pretrained(self.model, str(ap), adapter_name=name, is_trainable=False).eval()
                self._has_peft = True
            else:
                self.model.load_adapter(str(ap), adapter_name=name, is_trainable=False)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"PEFT could not load the adapter on {self.base} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})", ap) from None
        self.adapters[name] = str(path)

    def render(self, prompt: str, settings: GenSettings) -> str:
        if not settings.chat_template or not getattr(self.tokenizer, "chat_template", None):
            return prompt
        msgs = ([{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []) + \
            [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _select(self, adapter: str | None):
        import contextlib

        if adapter is None:
            return self.model.disable_adapter() if self._has_peft else contextlib.nullcontext()
        if adapter not in self.adapters:
            raise UsageError(f"unknown adapter {adapter!r} (loaded: {', '.join(self.adapters) or 'none'})")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def generate(self, prompts, adapter, settings, on_batch=None):
        import torch
        from transformers import LogitsProcessorList

        texts = [self.render(p, settings) for p in prompts]
        eos_ids = self._eos_ids()
        out: list[Generation] = []
        bs = max(1, settings.batch_size)
        # longest first within the call: less padding per batch; results put back in order
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        results: dict[int, Generation] = {}
        with self._select(adapter), torch.inference_mode():
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                     add_special_tokens=not settings.chat_template or not getattr(self.tokenizer, "chat_template", None)).to(self.device)
                plen = enc["input_ids"].shape[1]
                stats = _TokenStats(plen)
                kw: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                                          pad_token_id=self.tokenizer.pad_token_id,
                                          logits_processor=LogitsProcessorList([stats]))
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
                    finished = False
                    for k, t in enumerate(toks):
                        if t in eos_ids:
                            n, finished = k + 1, True
                            break
                    text = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
                    m = min(n, lp.shape[1])
                    nll = float(-lp[j, :m].mean()) if m else None
                    me = float(ent[j, :min(n, ent.shape[1])].mean()) if n else None
                    gens.append(Generation(text.strip(), n, dt, len(idx), nll, me, finished))
                for i, g in zip(idx, gens):
                    results[i] = g
                if on_batch:
                    on_batch(s, gens)
        out = [results[i] for i in range(len(texts))]
        return out

    def _eos_ids(self) -> set[int]:
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
        d.update(device=self.device, dtype=self.dtype, padding_side="left", adapters_merged=False)
        return d


# -- vLLM (optional) --------------------------------------------------------------------------------

class VLLMBackend(Backend):
    """vLLM engine with LoRA enabled; one ``LoRARequest`` per adapter (base: no request).
    Install with ``pip install 'safeprune[vllm]'`` on a machine with a supported GPU."""

    name = "vllm"

    def __init__(self, base: str, adapters: dict[str, str] | None = None, *, max_lora_rank: int | None = None,
                 dtype: str = "float32", **engine_kwargs: Any):
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
        self.llm = LLM(model=self.base, enable_lora=bool(self.adapters), max_lora_rank=max_lora_rank or max(ranks + [16]),
                       max_loras=max(1, len(self.adapters)), dtype=dtype, **engine_kwargs)
        self.requests = {n: LoRARequest(n, i + 1, str(Path(p).resolve())) for i, (n, p) in enumerate(self.adapters.items())}
        self.tokenizer = self.llm.get_tokenizer()
        self._hash: str | None = None

    def add_adapter(self, name: str, path: str | Path) -> None:
        if name in self.adapters:
            return super().add_adapter(name, path)
        if not self.requests:
            raise UnsupportedError("the vllm engine was started without LoRA; start it with at least one adapter "
                                   "to add more")
        from vllm.lora.request import LoRARequest

        self.adapters[name] = str(path)
        self.requests[name] = LoRARequest(name, len(self.requests) + 1, str(Path(path).resolve()))

    def render(self, prompt, settings):
        msgs = ([{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []) + \
            [{"role": "user", "content": prompt}]
        if settings.chat_template and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return prompt

    def generate(self, prompts, adapter, settings, on_batch=None):
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature if settings.do_sample else 0.0,
                            top_p=settings.top_p if settings.do_sample else 1.0, seed=settings.seed, logprobs=1)
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
            out.append(Generation(o.text.strip(), len(o.token_ids), dt, len(texts), nll, None,
                                  o.finish_reason == "stop"))
        if on_batch:
            on_batch(0, out)
        return out


BACKENDS = {"hf": HFBackend, "vllm": VLLMBackend, "fake": FakeBackend}


def make_backend(name: str, base: str, adapters: dict[str, str] | None = None, **kw: Any) -> Backend:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name](base, adapters, **kw)


def tokens_per_second(gens: Sequence[Generation]) -> float:
    """Generated tokens over wall time, counting each batch's time once."""
    toks = sum(g.new_tokens for g in gens)
    secs = sum(g.batch_seconds / max(1, g.batch_size) for g in gens)
    return toks / secs if secs > 0 else math.nan
