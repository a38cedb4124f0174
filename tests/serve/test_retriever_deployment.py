"""The Retriever deployment under a real Ray Serve: batched concurrent searches, one bad request
in a batch fails alone, typed errors cross the handle."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def retriever(serve_url, tmp_path_factory):
    from ray import serve

    from deployments.retriever import Retriever

    config = {"data_dir": str(tmp_path_factory.mktemp("retrieval")), "builtin_documents": False}
    deployment = Retriever.options(ray_actor_options={"num_cpus": 0.2}).bind(config)
    yield serve.run(deployment, name="retriever-test", route_prefix=None)
    serve.delete("retriever-test")


def test_concurrent_searches_with_one_bad_store(retriever):
    from models.openai.errors import to_openai_error

    async def scenario():
        text = b"Penguins live in the southern hemisphere.\n\nCamels store fat in their humps."
        f = await retriever.create_file.remote("animals.txt", text, "assistants")
        vs = await retriever.create_vector_store.remote(name="animals", file_ids=[f["id"]])
        calls = [
            retriever.search.remote(
                "where do penguins live?", [vs["id"]] if i % 8 else ["vs_gone"], 1
            )
            for i in range(32)
        ]
        return f, await asyncio.gather(*calls, return_exceptions=True)

    f, results = asyncio.run(scenario())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 4
    assert all(to_openai_error(e).status_code == 404 for e in errors)
    assert "vs_gone" in to_openai_error(errors[0]).message
    hits = [r for r in results if not isinstance(r, BaseException)]
    assert len(hits) == 28 and all(
        h[0].file_id == f["id"] and "Penguins" in h[0].text for h in hits
    )
