"""The request guards, as plain ASGI middleware, outermost first.

- ``guard.GuardMiddleware``: an ``X-Request-ID`` on every answer, then who may use the API
  (the token or, without one, this machine: ``xml_pipeline.api.auth``).
- ``limits.RequestLimitMiddleware``: at most ``organism.api.max_requests`` requests are
  handled at once; more get 503 with ``Retry-After``, so overload never queues without bound.
  A request counts once its body is complete, and a body must arrive within
  ``organism.api.body_timeout`` (408 after it), so that slow senders cannot hold the slots
  that other clients need.
- ``body.BodyLimitMiddleware``: request bodies are capped; a larger body gets 413 before the
  endpoint sees it.
"""
