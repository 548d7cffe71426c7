"""The OpenAI content walks every upstream translation shares (``text_parts``, ``user_parts``): a malformed
part is a 400 naming it in each translation (Anthropic, Gemini, Bedrock), never a crash, and the texts and
parts that are well-formed come out as before."""

import pytest

from runestone.wire.anthropic_upstream import openai_to_anthropic_request
from runestone.wire.bedrock import openai_to_converse_request
from runestone.wire.errors import InvalidRequest
from runestone.wire.gemini import openai_to_gemini_request

TRANSLATIONS = {
    "anthropic": lambda body: openai_to_anthropic_request(body, model="m", stream=False),
    "gemini": openai_to_gemini_request,
    "bedrock": openai_to_converse_request,
}


def _body(*messages):
    return {"model": "m", "messages": list(messages)}


@pytest.mark.parametrize("name", TRANSLATIONS)
@pytest.mark.parametrize("content, param", [
    ([{"type": "file", "file": "not an object"}], "messages[0].content[0].file"),
    ([{"type": "text", "text": 5}], "messages[0].content[0].text"),
    ([{"type": "video", "url": "x"}], "messages[0].content[0].type"),
    ({"type": "text"}, "messages[0].content"),
])
def test_a_malformed_user_part_is_a_400_naming_it(name, content, param):
    with pytest.raises(InvalidRequest) as info:
        TRANSLATIONS[name](_body({"role": "user", "content": content}))
    assert info.value.param.startswith(param), info.value.param


@pytest.mark.parametrize("name", TRANSLATIONS)
def test_a_system_text_that_is_not_a_string_is_a_400(name):
    body = _body({"role": "system", "content": [{"type": "text", "text": 5}]}, {"role": "user", "content": "hi"})
    with pytest.raises(InvalidRequest) as info:
        TRANSLATIONS[name](body)
    assert info.value.param == "messages[0].content[0]"


def test_texts_and_parts_translate_as_each_upstream_takes_them():
    body = _body({"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                 {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "hi"},
                                              {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]})
    anthropic = TRANSLATIONS["anthropic"](body)
    assert anthropic["system"] == "a\n\nb"  # each system part a block of its own
    assert anthropic["messages"][0]["content"] == [
        {"type": "text", "text": "hi"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]
    gemini = TRANSLATIONS["gemini"](body)
    assert gemini["systemInstruction"]["parts"] == [{"text": "a"}, {"text": "b"}]
    assert gemini["contents"][0]["parts"] == [{"text": "hi"}, {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]
    bedrock = TRANSLATIONS["bedrock"](body)
    assert bedrock["system"] == [{"text": "a"}, {"text": "b"}]
    assert bedrock["messages"][0]["content"] == [{"text": "hi"}, {"image": {"format": "png", "source": {"bytes": "AAAA"}}}]
