"""Embeddings requests: base64 encoding honoured (as the SDK decodes it), fields the server
cannot honour (`dimensions`) refused with a 400 naming them."""

from __future__ import annotations

import base64
import struct

import pytest

from models.openai.errors import OpenAIError
from models.openai.protocol import EmbeddingRequest, parse_request


def test_base64_is_little_endian_float32_and_floats_stay_floats():
    vectors = [[0.5, -1.25, 3.0], [0.0, 1.0, 2.0]]
    b64 = parse_request(EmbeddingRequest, {"input": ["a", "b"], "encoding_format": "base64"})
    data = b64.respond(vectors).model_dump()["data"]
    assert [list(struct.unpack("<3f", base64.b64decode(d["embedding"]))) for d in data] == vectors
    floats = parse_request(EmbeddingRequest, {"input": "a"}).respond(vectors[:1]).model_dump()
    assert floats["data"][0]["embedding"] == vectors[0]


@pytest.mark.parametrize("body, param", [({"dimensions": 64}, "dimensions"),
                                         ({"encoding_format": "int8"}, "encoding_format")])
def test_what_embeddings_cannot_honour_is_a_400(body, param):
    with pytest.raises(OpenAIError) as err:
        parse_request(EmbeddingRequest, {"input": "a", **body})
    assert err.value.status_code == 400 and err.value.param == param
