"""Chat templates and conversation encoding: each named template against hand-written renderings
and token lists, a tower's own template against transformers' apply_chat_template, the assistant-
only loss mask, image placement, truncation and every reason a sample is skipped."""
import pytest

from mmgpt_engine.data.chat import LLAVA_SYSTEM, ChatTemplate, ChatTemplateError, resolve_template
from mmgpt_engine.data.conversation import (IMAGE_TOKEN_ID, SkipSample, encode_conversation, llava_messages,
                                            special_tokens_of)
from mmgpt_engine.data.tokenizer import HFTokenizer
from mmgpt_engine.ops import IGNORE_INDEX as X

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<image>"]
WORDS = ["what", "colour", "is", "it?", "red", "and", "now?", "blue", "a", "circle", "USER:", "ASSISTANT:",
         "user", "assistant", "system", "be", "brief", "xa", "b", "xab"] + LLAVA_SYSTEM.split()


def word_tokenizer():
    """Words split on whitespace, the special tokens matched anywhere in the text: ids are easy to
    write down by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIALS + ["<unk>"] + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return HFTokenizer(tok, source="test-words")


TOK = word_tokenizer()
ID = {t: TOK.tokenizer.token_to_id(t) for t in SPECIALS + WORDS}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
TWO_TURNS = [{"role": "user", "content": "<image>\nwhat colour is it?"}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "and now?"}, {"role": "assistant", "content": "blue"}]


def ids(text):
    return [ID[w] for w in text.split()]


def test_chatml_renders_and_scores_the_replies_with_their_end_token():
    t = ChatTemplate.named("chatml")
    text = t.render(TWO_TURNS, SPECIAL)
    assert text == ("<|im_start|>user\n<image>\nwhat colour is it?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
                    "<|im_start|>user\nand now?<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>\n")
    assert t.render(TWO_TURNS[:1], SPECIAL, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    scored = [p for p, s in t.segments(TWO_TURNS, SPECIAL) if s]
    assert scored == ["red<|im_end|>", "blue<|im_end|>"]
    enc = encode_conversation(TOK, t, TWO_TURNS, n_images=1, special_tokens=SPECIAL)
    s, e = ID["<|im_start|>"], ID["<|im_end|>"]
    want_ids = ([s, ID["user"], IMAGE_TOKEN_ID] + ids("what colour is it?") + [e, s, ID["assistant"], ID["red"], e,
                s, ID["user"]] + ids("and now?") + [e, s, ID["assistant"], ID["blue"], e])
    want_labels = [X] * 10 + [ID["red"], e] + [X] * 7 + [ID["blue"], e]
    assert enc.input_ids == want_ids and enc.labels == want_labels and enc.scored == 4


def test_llava_v1_matches_the_vicuna_v1_format():
    t = ChatTemplate.named("llava_v1")
    text = t.render(TWO_TURNS, SPECIAL)
    assert text == (f"<s>{LLAVA_SYSTEM} USER: <image>\nwhat colour is it? ASSISTANT: red</s> USER: and now? "
                    f"ASSISTANT: blue</s>")
    assert t.render(TWO_TURNS[:3], SPECIAL, add_generation_prompt=True).endswith("USER: and now? ASSISTANT:")
    assert [p for p, s in t.segments(TWO_TURNS, SPECIAL) if s] == [" red</s>", " blue</s>"]
    enc = encode_conversation(TOK, t, TWO_TURNS, n_images=1, special_tokens=SPECIAL)
    head = [ID["<s>"]] + ids(LLAVA_SYSTEM) + [ID["USER:"], IMAGE_TOKEN_ID] + ids("what colour is it? ASSISTANT:")
    assert enc.input_ids == head + [ID["red"], ID["</s>"]] + ids("USER: and now? ASSISTANT:") + [ID["blue"], ID["</s>"]]
    assert enc.labels == [X] * len(head) + [ID["red"], ID["</s>"]] + [X] * 4 + [ID["blue"], ID["</s>"]]


def test_plain_keeps_the_image_and_the_caption_only():
    t = ChatTemplate.named("plain")
    msgs = [{"role": "user", "content": "<image>\nDescribe it briefly."}, {"role": "assistant", "content": "a red circle"}]
    assert t.render(msgs, SPECIAL) == "<image>a red circle</s>"
    enc = encode_conversation(TOK, t, msgs, n_images=1, special_tokens=SPECIAL)
    assert enc.input_ids == [IMAGE_TOKEN_ID] + ids("a red circle") + [ID["</s>"]]
    assert enc.labels == [X] + ids("a red circle") + [ID["</s>"]]


def test_a_towers_own_template_renders_as_transformers_renders_it(tmp_path):
    from transformers import PreTrainedTokenizerFast

    own = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nbe brief<|im_end|>\\n' }}{% endif %}"
           "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + "
           "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    hf = PreTrainedTokenizerFast(tokenizer_object=TOK.tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = own
    hf.save_pretrained(tmp_path)
    template = resolve_template("tokenizer", tmp_path)
    for gen in (False, True):
        msgs = TWO_TURNS[:3] if gen else TWO_TURNS
        assert template.render(msgs, SPECIAL, add_generation_prompt=gen) == hf.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen)
    enc = encode_conversation(TOK, template, TWO_TURNS, n_images=1, special_tokens=SPECIAL)
    assert [t for t in enc.labels if t != X] == [ID["red"], ID["<|im_end|>"], ID["blue"], ID["<|im_end|>"]]


def test_template_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"chat template: expected one of \['chatml', 'llava_v1', 'plain'\]"):
        ChatTemplate.named("vicuna")
    with pytest.raises(ValueError, match="data.chat_template: the tokenizer's own template was asked for, but there "
                                         "is none"):
        resolve_template(None, tmp_path)
    rewriting = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                             "{% if add_generation_prompt %}[ask]{% endif %}", "rewriting")
    with pytest.raises(ChatTemplateError, match=r"rewriting: the rendering of turns 0..1 does not extend the prompt"):
        rewriting.segments(TWO_TURNS[:2], SPECIAL)
    with pytest.raises(ValueError, match=r"messages\[1\]: expected \{'role': one of"):
        ChatTemplate.named("chatml").render([TWO_TURNS[0], {"role": "bot", "content": "x"}])


def test_llava_records_to_messages_and_the_reasons_to_skip():
    record = {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "what colour is it?"},
                                                            {"from": "gpt", "value": "red"}]}
    messages, n, notes = llava_messages(record)
    assert n == 1 and notes == ["image_marker_added"] and messages[0]["content"] == "<image>\nwhat colour is it?"
    text_only = {"id": "2", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]}
    assert llava_messages(text_only)[1:] == (0, [])
    cases = {
        "unknown_role": {"image": "a", "conversations": [{"from": "robot", "value": "x"}]},
        "ends_with_user": {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"},
                                             {"from": "human", "value": "z"}]},
        "image_marker_without_image": {"conversations": [{"from": "human", "value": "<image> x"},
                                                         {"from": "gpt", "value": "y"}]},
        "more_markers_than_images": {"image": "a", "conversations": [{"from": "human", "value": "<image><image>"},
                                                                     {"from": "gpt", "value": "y"}]},
        "unreadable_record": {"conversations": []},
    }
    for reason, rec in cases.items():
        with pytest.raises(SkipSample) as info:
            llava_messages(rec)
        assert info.value.reason == reason


def test_truncation_shortens_text_never_the_image():
    t = ChatTemplate.named("chatml")
    full = encode_conversation(TOK, t, TWO_TURNS, n_images=1, image_tokens=4, special_tokens=SPECIAL)
    width = len(full.input_ids) + 3
    cut = encode_conversation(TOK, t, TWO_TURNS, n_images=1, image_tokens=4, max_len=width - 3, special_tokens=SPECIAL)
    assert cut.truncated and cut.input_ids == full.input_ids[:-3] and cut.scored == 2
    with pytest.raises(SkipSample) as info:   # the image (4 tokens from position 2) cannot fit in 5
        encode_conversation(TOK, t, TWO_TURNS, n_images=1, image_tokens=4, max_len=5, special_tokens=SPECIAL)
    assert info.value.reason == "image_truncated"
    with pytest.raises(SkipSample) as info:   # the image fits, no reply does
        encode_conversation(TOK, t, TWO_TURNS, n_images=1, image_tokens=4, max_len=12, special_tokens=SPECIAL)
    assert info.value.reason == "no_scored_tokens"


def test_turns_that_tokenise_differently_apart_are_skipped():
    glued = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}", "glued")
    msgs = [{"role": "user", "content": "xa"}, {"role": "assistant", "content": "b"}]
    assert TOK.encode("xab") == [ID["xab"]] != TOK.encode("xa") + TOK.encode("b")
    with pytest.raises(SkipSample) as info:
        encode_conversation(TOK, glued, msgs, special_tokens=SPECIAL)
    assert info.value.reason == "retokenize_mismatch"


def test_special_tokens_must_be_single_ids():
    assert special_tokens_of(TOK) == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    from mmgpt_engine.data.tokenizer import ByteTokenizer

    with pytest.raises(ValueError, match="tokenizer: expected a tokenizer with named special tokens"):
        special_tokens_of(ByteTokenizer())
