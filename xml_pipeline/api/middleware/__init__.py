"""The request guards, in one pure-ASGI layer in front of every endpoint.

- ``guard.Guard``: an ``X-Request-ID`` on every answer, who may use the API (the token or,
  without one, this machine: ``xml_pipeline.api.auth``), at most ``organism.api.max_requests``
  requests handled at once (503 with ``Retry-After`` past them), request bodies within
  ``organism.api.body_timeout`` (408 after it) and under the size cap (413).
- ``limits.Exchange``: one request's ``receive`` and ``send`` with those rules applied: its
  slot, its body's deadline and size, the connection closed after an early answer.
"""
