"""What every upstream translation (Anthropic, Gemini, Bedrock) reads the same way: the messages array, each
message an object, else a 400 naming it; an image as a data URL, its media type and base64 data carried over,
a data URL that is not base64 a 400 naming the part."""

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


def _image(url):
    return {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]}


def test_data_url_media_type_and_data_carried_over():
    url = "data:image/png;base64,iVBORw0KGgo="
    assert openai_to_anthropic_request(_image(url), model="m", stream=False)["messages"][0]["content"][1] == {
        "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    assert openai_to_gemini_request(_image(url))["contents"][0]["parts"][1] == {
        "inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
    block = openai_to_converse_request(_image(url))["messages"][0]["content"][1]
    assert block["image"]["format"] == "png"


@pytest.mark.parametrize("name", sorted(TRANSLATIONS))
@pytest.mark.parametrize("url", ["data:image/png,iVBORw0KGgo=", "data:image/png;base64"])
def test_data_url_not_base64_is_a_400_naming_the_part(name, url):
    with pytest.raises(InvalidRequest) as info:
        TRANSLATIONS[name](_image(url))
    assert info.value.param == "messages[0].content[1].image_url"
    assert "data URLs must be base64 encoded" in str(info.value)


@pytest.mark.parametrize("name", sorted(TRANSLATIONS))
@pytest.mark.parametrize(("messages", "param", "message"), [
    ({"role": "user", "content": "hi"}, "messages", "messages must be an array"),
    ([{"role": "user", "content": "hi"}, "hi"], "messages[1]", "each message must be an object"),
])
def test_messages_not_an_array_of_objects_is_a_400_naming_it(name, messages, param, message):
    with pytest.raises(InvalidRequest) as info:
        TRANSLATIONS[name]({"model": "m", "messages": messages})
    assert (info.value.param, info.value.message) == (param, message)
