"""Retrieval: upload documents, chunk and embed them into per-store FAISS indexes, search them,
and cite what was found.

- store.DocumentStore: files, vector stores, attach, search (persisted, crash-safe); a facade
  over catalogue.Catalogue (SQLite: files, stores, attachments, chunks), blobs.BlobStore (the
  uploaded bytes), index.VectorStoreIndexes (a FAISS index per store) and search.search_indexes
- service.RetrieverService: what the Retriever deployment serves; InProcessHandle runs it without Ray
- prompt.format_sources / sources_for_response: hits into the prompt and the response
- errors: typed errors with status_code and code (404, 413, 415, 400)

Nothing is imported here, so `models.retrieval.config` stays light (no FAISS, no torch).
"""
