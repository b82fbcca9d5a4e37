"""The HTTP API of a running organism (Starlette, under ``/api/v1``).

``xml_pipeline.api.app.create_app`` builds the application; ``xml_pipeline.api.server.serve``
runs it with uvicorn. In front of the endpoints stand the guards (``middleware``: the request
id, who may use the API (``auth``), the limits); ``views`` (reads) and ``commands`` (writes)
hold the endpoints by resource, and ``stream`` the live tail (Server-Sent Events and
WebSocket). ``requests`` and ``responses`` are what endpoints read and answer; ``openapi``
builds the document from their docstrings and ``shapes``. ``docs/api.md`` describes every
endpoint.
"""
