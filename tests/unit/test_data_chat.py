"""Conversations in every common shape train on exactly the tokens of the same conversation written
as plain string ``messages``: content parts, ShareGPT, renamed fields and roles, which turns carry
loss, tool calls; and what cannot be trained on is refused with the row, message and part."""

import copy
import json

import pytest

from allora_ds.config import DataConfig, ModelConfig
from allora_ds.data import IGNORE, check_fields, load_records, tokenize
from allora_ds.errors import UserError
from tests.llama3 import BOS_ID, EOT_ID

CONVERSATION = [("system", "You answer briefly."), ("user", "Sort 3 1 2"), ("assistant", "1 2 3"),
                ("user", "Reverse it, please."), ("assistant", "3 2 1 - done.")]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}


def plain(conv=CONVERSATION):
    return {"messages": [{"role": r, "content": c} for r, c in conv]}


def parts(conv=CONVERSATION):
    """Each content split into text parts at its spaces (the spaces kept): joined, the same string."""
    def split(text):
        words = text.split(" ")
        return [{"type": "text", "text": w + (" " if k < len(words) - 1 else "")} for k, w in enumerate(words)]
    return {"messages": [{"role": r, "content": split(c)} for r, c in conv]}


def sharegpt(conv=CONVERSATION, role="from", content="value", key="conversations", names=SHAREGPT_ROLE):
    return {key: [{role: names[r], content: c} for r, c in conv]}


def encode(tmp_path, tok, rows, name="d.jsonl", **cfg):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dc = DataConfig(train=str(p), **{"format": "chat", **cfg})
    ds = load_records(str(p), "train", "data.train")
    out, _ = tokenize(ds, tok, dc, str(p), check_fields(ds, dc, "data.train", str(p)))
    return [(r["input_ids"], r["labels"]) for r in out]


@pytest.fixture(scope="module", params=["tiny", "llama3"])
def tok(request):
    """The demo's sentencepiece tokenizer and Meta's Llama-3 tokenizer, both with a Llama-3 chat template."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny_tokenizer")
    from allora_ds.modeling import load_tokenizer

    return load_tokenizer(ModelConfig(path=str(request.getfixturevalue("llama3_dir"))))


def meta_reference(conv, trained):
    """Meta's own encoding of the dialog (llama-models' ChatFormat), labels on the ``trained`` turns."""
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    meta = Tokenizer.get_instance()
    fmt = ChatFormat(meta)
    ids, labels = [BOS_ID], [IGNORE]
    for i, (role, content) in enumerate(conv):
        header = fmt._encode_header(role)
        body = meta.encode(content.strip(), bos=False, eos=False) + [EOT_ID]
        ids += header + body
        labels += [IGNORE] * len(header) + (body if i in trained else [IGNORE] * len(body))
    return ids, labels


def test_every_shape_trains_exactly_like_plain_string_messages(tmp_path, tok):
    reference = encode(tmp_path, tok, [plain()])
    assert [t for t in reference[0][1] if t != IGNORE], "the reference learns something"
    renamed = sharegpt(role="speaker", content="text", key="dialog",
                       names={"system": "sys", "user": "customer", "assistant": "agent"})
    cases = {
        "content parts": encode(tmp_path, tok, [parts()], name="parts.jsonl"),
        "sharegpt": encode(tmp_path, tok, [sharegpt()], name="sg.jsonl", format="sharegpt"),
        "sharegpt detected in a chat file": encode(tmp_path, tok, [sharegpt()], name="sg-chat.jsonl", format="chat"),
        "renamed fields and roles": encode(tmp_path, tok, [renamed], name="renamed.jsonl", format="sharegpt",
                                           fields={"messages": "dialog", "role": "speaker", "content": "text"},
                                           roles={"sys": "system", "customer": "user", "agent": "assistant"}),
    }
    for name, got in cases.items():
        assert got == reference, f"{name}: tokens or labels differ from the plain-string conversation"


def test_plain_messages_match_metas_encoder(tmp_path, llama3_dir):
    from allora_ds.modeling import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(llama3_dir)))
    for fmt, rows in (("chat", [plain()]), ("chat", [parts()]), ("sharegpt", [sharegpt()])):
        assert encode(tmp_path, tok, rows, format=fmt) == [meta_reference(CONVERSATION, {2, 4})], fmt


def test_which_turns_carry_loss(tmp_path, tok):
    def learned(rows, **cfg):
        (ids, labels), = encode(tmp_path, tok, rows, **cfg)
        assert len(ids) == len(labels)
        return tok.decode([t for t in labels if t != IGNORE])

    eot = "<|eot_id|>"
    assert learned([plain()]) == f"1 2 3{eot}3 2 1 - done.{eot}"
    assert learned([plain()], train_on="last_assistant") == f"3 2 1 - done.{eot}"
    flagged = copy.deepcopy(plain())
    flagged["messages"][2]["train"] = False
    flagged["messages"][4]["train"] = True
    assert learned([flagged], fields={"train": "train"}) == f"3 2 1 - done.{eot}"
    assert learned([flagged]) == f"1 2 3{eot}3 2 1 - done.{eot}", "the flag counts only where data.fields names it"
    sg = sharegpt()
    sg["conversations"][4]["weight"] = False
    assert learned([sg], format="sharegpt", fields={"train": "weight"}) == f"1 2 3{eot}"


def test_only_the_last_turn_and_flags_match_metas_labels(tmp_path, llama3_dir):
    from allora_ds.modeling import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(llama3_dir)))
    assert encode(tmp_path, tok, [plain()], train_on="last_assistant") == [meta_reference(CONVERSATION, {4})]
    flagged = copy.deepcopy(plain())
    flagged["messages"][4]["keep"] = False
    assert encode(tmp_path, tok, [flagged], fields={"train": "keep"}) == [meta_reference(CONVERSATION, {2})]


# A tool-capable template in the style of Llama-3.1's: an assistant turn with tool_calls is rendered as
# the JSON call, a tool turn under the ipython header.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'tool' %}{{ '<|start_header_id|>ipython<|end_header_id|>\n\n' + message.content + '<|eot_id|>' }}"
    "{% elif message.tool_calls is defined %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% for call in message.tool_calls %}{{ '{\"name\": \"' + call.function.name + '\", \"parameters\": ' }}"
    "{{ call.function.arguments | tojson }}{{ '}' }}{% endfor %}{{ '<|eot_id|>' }}"
    "{% else %}{{ '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture
def tool_tok(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def test_tool_calls_are_rendered_by_the_template_and_learned(tmp_path, tool_tok):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": 2, "b": 3})}}
    openai = {"messages": [{"role": "user", "content": "What is 2 plus 3?"},
                           {"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "c1", "content": "5"},
                           {"role": "assistant", "content": "It is 5."}]}
    (ids, labels), = encode(tmp_path, tool_tok, [openai])
    learned = tool_tok.decode([t for t in labels if t != IGNORE])
    assert learned == '{"name": "add", "parameters": {"a": 2, "b": 3}}<|eot_id|>It is 5.<|eot_id|>', learned
    assert "ipython<|end_header_id|>\n\n5<|eot_id|>" in tool_tok.decode(ids), "the tool's answer is in the prompt"
    as_dict = copy.deepcopy(openai)
    as_dict["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"a": 2, "b": 3}
    llamafactory = {"conversations": [{"from": "human", "value": "What is 2 plus 3?"},
                                      {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})},
                                      {"from": "observation", "value": "5"}, {"from": "gpt", "value": "It is 5."}]}
    assert encode(tmp_path, tool_tok, [as_dict], name="b.jsonl") == [(ids, labels)]
    assert encode(tmp_path, tool_tok, [llamafactory], name="c.jsonl", format="sharegpt") == [(ids, labels)]


def _msgs(*turns):
    return {"messages": list(turns)}


U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
REFUSED = [
    ("image-part", _msgs({"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                                      {"type": "image_url", "image_url": {"url": "x.png"}}]}, A), {},
     r"d.jsonl: row 1: message 1, part 2 has type 'image_url': only text parts can be trained on"),
    ("untyped-part", _msgs({"role": "user", "content": [{"text": "hi"}]}, A), {}, r"row 1: message 1, part 1 has no 'type'"),
    ("null-content", _msgs(U, {"role": "assistant", "content": None}), {}, r"row 1: message 2 \(assistant\) has no 'content' \(null or missing\)"),
    ("missing-content", _msgs(U, {"role": "assistant"}), {}, r"row 1: message 2 \(assistant\) has no 'content' \(null or missing\)"),
    ("content-number", _msgs(U, {"role": "assistant", "content": 5}), {}, r"row 1: message 2: 'content' must be a string or a list of parts, got int"),
    ("unknown-role", _msgs({"role": "narrator", "content": "once"}, U, A), {}, r"row 1: message 1: unknown role 'narrator' \(known: .*map others with data.roles\)"),
    ("sharegpt-unknown-role", {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
     {"format": "sharegpt"}, r"row 1: message 2: unknown role 'robot'"),
    ("sharegpt-in-messages", {"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}, {},
     r"row 1: message 1 has no 'role' \(a string\) \(ShareGPT turns\? set data.format: sharegpt\)"),
    ("tool-without-template-support", _msgs(U, {"role": "tool", "content": "5"}, A), {},
     r"row 1: message 2: a 'tool' turn, but the tokenizer's chat template renders no tool turns"),
    ("tool-calls-without-template-support",
     _msgs(U, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}), {},
     r"row 1: message 2 has tool_calls, but the tokenizer's chat template does not render tool calls"),
    ("flag-not-boolean", _msgs(U, {**A, "train": "yes"}), {"fields": {"train": "train"}},
     r"row 1: message 2: field 'train' must be true or false, got 'yes'"),
    ("every-turn-excluded", _msgs(U, {**A, "train": False}), {"fields": {"train": "train"}},
     r"row 1: no assistant turn is left to learn from: field 'train' excludes every one"),
    ("empty-conversation", {"messages": []}, {}, r"row 1: 'messages' must be a non-empty list of turns"),
]


@pytest.mark.parametrize("rows, cfg, message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_what_cannot_be_trained_on_is_refused_with_row_and_message(tmp_path, tiny_tokenizer, rows, cfg, message):
    with pytest.raises(UserError, match=message):
        encode(tmp_path, tiny_tokenizer, [rows], **cfg)


def test_the_failing_row_is_named_among_good_ones(tmp_path, tiny_tokenizer):
    bad = _msgs(U, {"role": "assistant", "content": [{"type": "input_audio", "input_audio": {}}]})
    with pytest.raises(UserError, match=r"row 3: message 2, part 1 has type 'input_audio'"):
        encode(tmp_path, tiny_tokenizer, [plain(), parts(), bad])


def test_a_sharegpt_finetune_stops_where_a_chat_one_does(tiny_tokenizer):
    """Export writes the stop tokens of the trained format into the generation config."""
    from allora_ds.modeling import stop_token_ids

    assert stop_token_ids(tiny_tokenizer, "sharegpt") == stop_token_ids(tiny_tokenizer, "chat") == \
        [tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")]


@pytest.mark.parametrize("train, want", [
    ("data.jsonl", ["<|end_of_text|>"]),
    ([{"path": "a.jsonl"}, {"path": "c.jsonl", "format": "chat"}], ["<|end_of_text|>", "<|eot_id|>"]),
])
def test_an_exported_mixture_stops_on_the_ends_of_all_its_formats(tmp_path, tiny_tokenizer, train, want):
    """An alpaca top level with a chat source in the mixture: replies of both kinds must stop."""
    from allora_ds.export import add_stop_tokens

    tiny_tokenizer.save_pretrained(tmp_path)
    eos = tiny_tokenizer.eos_token_id
    add_stop_tokens(tmp_path, {"model": {}, "data": {"format": "alpaca", "train": train}}, {"eos_token_id": eos})
    gen = tmp_path / "generation_config.json"
    got = json.loads(gen.read_text())["eos_token_id"] if gen.is_file() else eos
    assert ([got] if isinstance(got, int) else got) == tiny_tokenizer.convert_tokens_to_ids(want)
