"""The HTTP API of a running organism (Starlette, under ``/api/v1``).

``xml_pipeline.api.app.create_app`` builds the application; ``xml_pipeline.api.server.serve``
runs it with uvicorn. ``docs/api.md`` describes every endpoint.
"""
