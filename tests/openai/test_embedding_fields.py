"""Embeddings requests: base64 encoding honoured (as the SDK decodes it), `dimensions` shortens
and renormalises, usage counts tokens, what the server cannot honour is a 400 naming it."""

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


def test_dimensions_shorten_and_renormalise_and_usage_counts_tokens():
    req = parse_request(EmbeddingRequest, {"input": ["a"], "dimensions": 2})
    out = req.respond([[3.0, 4.0, 12.0]], tokens=5).model_dump()
    assert out["data"][0]["embedding"] == [0.6, 0.8]
    assert out["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    with pytest.raises(OpenAIError) as err:
        req.model_copy(update={"dimensions": 4}).respond([[3.0, 4.0, 12.0]])
    assert err.value.status_code == 400 and err.value.param == "dimensions"


@pytest.mark.parametrize("body, param", [({"dimensions": 0}, "dimensions"),
                                         ({"encoding_format": "int8"}, "encoding_format"),
                                         ({"truncate": True}, "truncate")])
def test_what_embeddings_cannot_honour_is_a_400(body, param):
    with pytest.raises(OpenAIError) as err:
        parse_request(EmbeddingRequest, {"input": "a", **body})
    assert err.value.status_code == 400 and err.value.param == param
