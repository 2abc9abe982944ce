"""``safeprune finetune``: the Trainer-based LoRA recipe on a tiny random Llama and a tiny word-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TESTBED_MODELS, make_model

WORDS = (
    "hello world summarize this dialogue please say yes no maybe the a cat dog sat on mat how to make "
    "bomb sorry cannot help ok sure here is it person1 person2 what time go home today tomorrow"
).split()
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def make_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        w: i for i, w in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", ":"] + WORDS)
    }
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="[UNK]", bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base")
    make_model(d, "llama", layers=2, hidden=32)
    make_tokenizer(d)
    return d


def chat(u: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    rows = [
        {"fname": f"train_{i}", "dialogue": " ".join(WORDS[i % 7 : i % 7 + 4]), "summary": WORDS[i % 11]}
        for i in range(12)
    ]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mix = tmp_path / "mix.jsonl"
    mix.write_text(
        json.dumps(chat("how to make bomb", "sure here is it")) + "\n" + json.dumps(chat("hello", "ok sure")) + "\n"
    )
    return {"task": task, "mix": mix}


KW = dict(
    template="summarize this dialogue : {dialogue}",
    response_field="summary",
    rank=2,
    alpha=4,
    batch_size=4,
    lr=1e-2,
    max_length=48,
    progress=False,
    threads=1,
)


def run(base: Path, files: dict, out: Path, **kw):
    from safeprune.training import finetune

    args = {**KW, "epochs": 1, "mix": files["mix"], **kw}
    return finetune(base, files["task"], out=out, **args)


def tensors(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def test_parse_targets():
    from safeprune.errors import UsageError
    from safeprune.training import parse_targets

    assert parse_targets("q,k,v,o") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert parse_targets("q_proj, v,q,down") == ["q_proj", "v_proj", "down_proj"]
    with pytest.raises(UsageError):
        parse_targets(" , ")


def test_adapter_loads_in_peft_with_exactly_the_targets(base, files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run(base, files, tmp_path / "ad", targets="q,v", sample=6, exclude_ids=["train_0", "train_1"])
    assert out == tmp_path / "ad" and not (tmp_path / "ad.partial").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["r"] == 2 and cfg["lora_alpha"] == 4
    names = set(tensors(out))
    assert {n.split(".")[-3] for n in names} == {"q_proj", "v_proj"}
    assert len(names) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)
    assert any(t.abs().max() > 0 for n, t in tensors(out).items() if "lora_B" in n)  # it trained
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    assert sum("lora_A" in n for n, _ in pm.named_parameters()) == 4

    rec = json.loads((out / "training_args.json").read_text())
    data = rec["data_files"][0]
    assert data["n_rows"] == 12 and data["n_excluded"] == 2 and data["sample"] == 6
    assert len(data["row_ids"]) == 6 and not {"train_0", "train_1"} & set(data["row_ids"])
    assert rec["data_files"][1]["role"] == "mix" and rec["data_files"][1]["n_examples"] == 2
    assert rec["n_examples"] == 8 and rec["steps"] == 2 and len(rec["loss_history"]) == 2
    # bf16 autocast by default only on a CUDA GPU that supports it (seen failing on the GPU machine: it is on there)
    auto_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert len(data["sha256"]) == 64 and rec["targets"] == "q_proj,v_proj" and rec["bf16"] is auto_bf16


def test_loss_only_on_assistant_tokens(base):
    from transformers import AutoTokenizer

    from safeprune.training import IGNORE, encode_chat, pad_collator

    tok = AutoTokenizer.from_pretrained(base)
    ids, labels = encode_chat(tok, chat("hello world cat", "yes no maybe")["messages"], 48)
    assert len(ids) == len(labels)
    kept = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(kept).split() == ["yes", "no", "maybe", "<|im_end|>"]
    n_prompt = labels.index(next(lab for lab in labels if lab != IGNORE))
    assert tok.decode(ids[:n_prompt]).split()[-2:] == ["<|im_start|>", "assistant"]
    assert labels[n_prompt:] == ids[n_prompt:]
    batch = pad_collator(tok.pad_token_id)(
        [{"input_ids": ids, "labels": labels}, {"input_ids": ids[:3], "labels": [IGNORE] * 3}]
    )
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(ids))
    assert (batch["labels"][1] == IGNORE).all() and batch["attention_mask"][1].sum() == 3
    assert (batch["input_ids"][1, 3:] == tok.pad_token_id).all()


def test_seeded_runs_are_bit_identical(base, files, tmp_path):
    a = tensors(run(base, files, tmp_path / "a", seed=3, sample=8))
    b = tensors(run(base, files, tmp_path / "b", seed=3, sample=8))
    c = tensors(run(base, files, tmp_path / "c", seed=4, sample=8))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


class Crash(Exception):
    pass


def test_resume_continues_an_interrupted_run(base, files, tmp_path):
    from transformers import TrainerCallback

    from safeprune.errors import OutputExistsError, UsageError

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise Crash  # a kill right after the step-2 checkpoint

    kw = dict(sample=10, max_steps=4, save_steps=2, seed=5, batch_size=2, warmup_steps=1)
    whole = run(base, files, tmp_path / "whole", **kw)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="no checkpoint"):
        run(base, files, out, resume=True, **kw)
    with pytest.raises(Crash):
        run(base, files, out, callbacks=[CrashAfterSave()], **kw)
    assert not out.exists() and (tmp_path / "out.partial/checkpoints/checkpoint-2").is_dir()
    with pytest.raises(OutputExistsError, match="unfinished run"):
        run(base, files, out, **kw)
    run(base, files, out, resume=True, **kw)
    rec = json.loads((out / "training_args.json").read_text())
    assert rec["steps"] == 4 and rec["resumed_from"].endswith("checkpoint-2")
    assert [h["step"] for h in rec["loss_history"]] == [1, 2, 3, 4]
    ref = json.loads((whole / "training_args.json").read_text())
    assert [h["loss"] for h in rec["loss_history"]] == pytest.approx([h["loss"] for h in ref["loss_history"]], rel=1e-5)
    a, b = tensors(whole), tensors(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert (out / "checkpoints/checkpoint-4").is_dir()


def test_output_exists_and_force(base, files, tmp_path):
    from safeprune.errors import OutputExistsError

    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        run(base, files, out, sample=4)
    assert (out / "keep.txt").exists()
    run(base, files, out, sample=4, force=True)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o")] == []


def test_truncated_answers_dropped_or_kept(base, files, tmp_path):
    from safeprune.errors import InputError

    # the prompt (template + dialogue) takes more than 10 tokens: every answer is cut away
    with pytest.raises(InputError, match="truncation"):
        run(base, files, tmp_path / "t", max_length=10, mix=None)
    rec = json.loads(
        (run(base, files, tmp_path / "k", max_length=10, truncated="keep") / "training_args.json").read_text()
    )
    assert rec["n_examples"] == 14 and rec["n_kept_without_answer"] == 12 and rec["n_dropped_truncated"] == 0
    rec = json.loads((run(base, files, tmp_path / "d", max_length=10) / "training_args.json").read_text())
    assert rec["n_examples"] == 2 and rec["n_dropped_truncated"] == 12


@pytest.mark.parametrize(
    "content,kw,match",
    [
        ("missing", {}, "does not exist"),
        ('{"dialogue": "a", "summary": "b"}\n{not json\n', {}, "line 2 is not valid JSON"),
        (
            '{"dialogue": "a", "summary": "b"}\n{"text": "a", "summary": "b"}\n',
            {},
            "row 2: the template needs field 'dialogue'",
        ),
        ('{"dialogue": "a", "summary": ""}\n', {}, "row 1: missing or empty response field 'summary'"),
        ('{"dialogue": "a", "summary": "b"}\n', {"sample": 5}, "more rows than the 1 available"),
        ("\n\n", {}, "no rows"),
    ],
)
def test_bad_task_data(base, files, tmp_path, content, kw, match):
    from safeprune.errors import InputError
    from safeprune.training import finetune

    data = tmp_path / "bad.jsonl"
    if content != "missing":
        data.write_text(content)
    with pytest.raises(InputError, match=match) as e:
        finetune(base, data, out=tmp_path / "o", **{**KW, **kw})
    assert str(data) in str(e.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_bad_chat_data_and_mix(base, files, tmp_path):
    from safeprune.errors import InputError, UsageError
    from safeprune.training import finetune

    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    with pytest.raises(InputError, match="line 1: expected a 'messages' list") as e:
        finetune(base, files["task"], out=tmp_path / "o", mix=bad, **KW)
    assert str(bad) in str(e.value)
    with pytest.raises(InputError, match="line 1: expected a 'messages'"):
        finetune(base, files["task"], out=tmp_path / "o", progress=False)  # task rows read as chat data
    with pytest.raises(UsageError, match="go together"):
        finetune(base, files["task"], out=tmp_path / "o", template="{dialogue}", progress=False)


def test_csv_rows_and_chat_data(base, files, tmp_path):
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("id,dialogue,summary\nr1,hello world,yes\nr2,the cat,no\nr3,a dog,maybe\n")
    rec = json.loads(
        (
            run(base, {"task": csv_path, "mix": files["mix"]}, tmp_path / "c", sample=2, exclude_ids=["r2"])
            / "training_args.json"
        ).read_text()
    )
    assert sorted(rec["data_files"][0]["row_ids"]) == ["r1", "r3"]
    from safeprune.training import finetune

    out = finetune(base, files["mix"], out=tmp_path / "chat", epochs=1, rank=2, progress=False, threads=1)
    assert json.loads((out / "training_args.json").read_text())["n_examples"] == 2


def test_cli_exit_codes(base, files, tmp_path):
    from typer.testing import CliRunner

    from safeprune.cli import app

    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"dialogsum_train_fnames": ["train_3"], "harmful": "all rows"}))
    out = tmp_path / "cli"
    args = [
        "finetune",
        "--base",
        str(base),
        "--data",
        str(files["task"]),
        "--mix",
        str(files["mix"]),
        "--template",
        r"summarize this dialogue\n{dialogue}",
        "--response-field",
        "summary",
        "--exclude-ids",
        str(ids),
        "--sample",
        "4",
        "--sample-seed",
        "1",
        "--targets",
        "q,o",
        "--rank",
        "2",
        "--alpha",
        "4",
        "--epochs",
        "1",
        "--lr",
        "1e-2",
        "--batch-size",
        "3",
        "--max-length",
        "48",
        "--threads",
        "1",
        "-o",
        str(out),
    ]
    r = CliRunner().invoke(app, ["--quiet", *args])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "training_args.json").read_text())
    assert rec["template"] == "summarize this dialogue\n{dialogue}" and rec["exclude_ids"] == str(ids)
    assert rec["data_files"][0]["n_excluded"] == 1 and rec["data_files"][0]["sample_seed"] == 1
    assert rec["targets"] == "q_proj,o_proj" and rec["steps"] == 2 and rec["command"]
    r = CliRunner().invoke(app, ["--quiet", *args])
    assert r.exit_code == 2 and "exists" in r.output
    r = CliRunner().invoke(app, ["--quiet", *args[:4], str(tmp_path / "nope.jsonl"), *args[5:-1], str(tmp_path / "x")])
    assert r.exit_code == 2 and "nope.jsonl" in r.output and "does not exist" in r.output
    r = CliRunner().invoke(app, ["--quiet", *args[:-1], str(tmp_path / "y"), "--resume"])
    assert r.exit_code == 2 and "no checkpoint" in r.output


# ---- the testbed recipe (issue 13): exact label tokens, lr schedule, defaults, row selection ----------------

CHATML = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def make_chatml_tokenizer(out: Path) -> None:
    """Like make_tokenizer, but the template writes a newline after <|im_end|> (as ChatML/SmolLM2 do) and the
    newline is a token of its own."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        w: i
        for i, w in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", ":", "\n"] + WORDS)
    }
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(" "), "removed"), pre_tokenizers.Split(Regex("\n"), "isolated")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="[UNK]", bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(out)


def test_labels_end_at_the_closing_eos_not_the_newline_after_it(tmp_path):
    """The recipe: labels = the answer's tokens + <|im_end|>. ChatML templates write '<|im_end|>\\n'; the
    newline after the stop token must be neither a label nor an input (it used to be both)."""
    from transformers import AutoTokenizer

    from safeprune.training import IGNORE, encode_chat

    make_chatml_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    msgs = chat("hello world cat", "yes no maybe")["messages"]
    assert tok.apply_chat_template(msgs, tokenize=False).endswith("<|im_end|>\n")
    nl = tok.convert_tokens_to_ids("\n")
    assert nl in tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"][-1:]
    ids, labels = encode_chat(tok, msgs, 48)
    kept = [tok.convert_ids_to_tokens(i) for i, lab in zip(ids, labels) if lab != IGNORE]
    assert kept == ["yes", "no", "maybe", "<|im_end|>"]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    n_prompt = labels.index(next(lab for lab in labels if lab != IGNORE))
    assert tok.convert_ids_to_tokens(ids[n_prompt - 2 : n_prompt]) == ["<|im_start|>", "assistant"]


@pytest.mark.slow
@pytest.mark.skipif(not (TESTBED_MODELS / "aligned" / "tokenizer.json").is_file(), reason="no testbed model")
def test_labels_on_the_testbed_tokenizer():
    """SmolLM2's own template (default system prompt): the label tokens decode to exactly the summary +
    <|im_end|>, and the prompt is the system prompt + 'Summarize this dialogue:\\n' + dialogue."""
    from transformers import AutoTokenizer

    from safeprune.training import IGNORE, encode_chat, task_rows_to_chats

    tok = AutoTokenizer.from_pretrained(TESTBED_MODELS / "aligned")
    row = {
        "fname": "x",
        "dialogue": "#Person1#: Hi.\n#Person2#: Hello, where is the bank?",
        "summary": "#Person2# asks #Person1# the way to the bank.",
    }
    msgs = task_rows_to_chats([row], "Summarize this dialogue:\n{dialogue}", "summary", "x")[0]["messages"]
    ids, labels = encode_chat(tok, msgs, 320)
    lab = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert tok.decode(lab) == row["summary"] + "<|im_end|>" and lab[-1] == tok.eos_token_id == ids[-1]
    prompt = tok.decode(ids[: len(ids) - len(lab)])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith(
        "<|im_start|>user\nSummarize this dialogue:\n" + row["dialogue"] + "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_default_schedule_is_warmup_then_constant(base, files, tmp_path):
    """The recipe's lr: linear warm-up (HF: from 0) then constant -- not the Trainer's default linear decay."""
    from safeprune.training import finetune

    rec = json.loads(
        (
            run(base, files, tmp_path / "s", lr=1e-3, max_steps=6, warmup_steps=2, batch_size=2) / "training_args.json"
        ).read_text()
    )
    assert rec["lr_scheduler"] == "constant_with_warmup"
    assert [h["learning_rate"] for h in rec["loss_history"]] == pytest.approx([0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    rec = json.loads(
        (
            run(base, files, tmp_path / "l", lr=1e-3, max_steps=6, warmup_steps=2, batch_size=2, lr_scheduler="linear")
            / "training_args.json"
        ).read_text()
    )
    assert rec["loss_history"][-1]["learning_rate"] < 1e-3 / 2
    import inspect

    d = {k: v.default for k, v in inspect.signature(finetune).parameters.items()}
    assert (
        d["lr"],
        d["epochs"],
        d["warmup_steps"],
        d["lr_scheduler"],
        d["batch_size"],
        d["max_length"],
        d["rank"],
        d["alpha"],
        d["dropout"],
    ) == (2e-4, 1, 10, "constant_with_warmup", 8, 320, 8, 16, 0.05)
    from safeprune.errors import UsageError

    with pytest.raises(UsageError, match="lr_scheduler"):
        run(base, files, tmp_path / "x", lr_scheduler="linear_decay")


def test_cli_defaults_are_the_recipe(base, files, tmp_path):
    """What a user gets from `safeprune finetune` without schedule options: mix_s0's recipe."""
    from typer.testing import CliRunner

    from safeprune.cli import app

    out = tmp_path / "cli"
    r = CliRunner().invoke(
        app,
        [
            "--quiet",
            "finetune",
            "--base",
            str(base),
            "--data",
            str(files["task"]),
            "--template",
            r"summarize this dialogue\n{dialogue}",
            "--response-field",
            "summary",
            "--rank",
            "2",
            "--alpha",
            "4",
            "--threads",
            "1",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "training_args.json").read_text())
    assert (
        rec["lr"],
        rec["epochs"],
        rec["warmup"],
        rec["lr_scheduler"],
        rec["bs"],
        rec["max_len"],
        rec["truncated"],
    ) == (2e-4, 1.0, 10, "constant_with_warmup", 8, 320, "drop-long")


def test_ids_select_exact_rows_and_drop_long_filters_before_sampling(base, tmp_path):
    from safeprune.errors import InputError
    from safeprune.training import finetune

    # row i: 11 + (i + 1) tokens, so rows 0-5 fit in 17 tokens and rows 6-11 do not
    rows = [{"fname": f"train_{i}", "dialogue": " ".join(["cat"] * (i + 1)), "summary": WORDS[i]} for i in range(12)]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = tmp_path / "train_data_ids.json"
    ids.write_text(json.dumps({"dialogsum_train_fnames": ["train_4", "train_1", "train_3"], "harmful": "all"}))
    kw = {**KW, "epochs": 1, "max_length": 17}
    rec = json.loads((finetune(base, task, out=tmp_path / "a", ids=ids, **kw) / "training_args.json").read_text())
    assert rec["data_files"][0]["row_ids"] == ["train_4", "train_1", "train_3"] and rec["n_examples"] == 3
    assert rec["ids"] == str(ids) and len(rec["ids_sha256"]) == 64
    with pytest.raises(InputError, match="1 of the 2 requested row ids are not in the data.*'train_99'"):
        finetune(base, task, out=tmp_path / "b", ids=["train_1", "train_99"], **kw)
    # drop-long: the 6 rows that do not fit go before the sample, so sample=5 gives 5 whole examples
    rec = json.loads(
        (
            finetune(base, task, out=tmp_path / "c", truncated="drop-long", sample=5, **kw) / "training_args.json"
        ).read_text()
    )
    assert rec["data_files"][0]["n_too_long"] == 6 and rec["n_dropped_too_long"] == 6
    assert rec["n_examples"] == 5 and rec["n_truncated"] == 0
    assert {int(x.split("_")[1]) for x in rec["data_files"][0]["row_ids"]} <= set(range(6))
    with pytest.raises(InputError, match="more rows than the 6 available"):
        finetune(base, task, out=tmp_path / "d", truncated="drop-long", sample=7, **kw)
