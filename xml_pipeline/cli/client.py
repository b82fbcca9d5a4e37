"""A small HTTP client for a running organism's API (used by the CLI's ``--url`` commands).

The token comes from ``XML_PIPELINE_API_TOKEN`` and travels only in the ``Authorization``
header. Errors come back as ``ClientError`` carrying the API's error code and message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # httpx (and the rich and pygments it imports) only for a request:
    import httpx  # a running server that works out its own URL need not load them

__all__ = ["Client", "ClientError", "default_url", "organism_url"]

TOKEN_ENV = "XML_PIPELINE_API_TOKEN"


class ClientError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def default_url(host: str = "127.0.0.1", port: int = 8765) -> str:
    """``XML_PIPELINE_URL``, else the given host and port (with ``XML_PIPELINE_HOST`` and
    ``XML_PIPELINE_PORT`` taking precedence over them)."""
    explicit = os.environ.get("XML_PIPELINE_URL")
    if explicit:
        return organism_url(explicit)
    host = os.environ.get("XML_PIPELINE_HOST", host)
    port = int(os.environ.get("XML_PIPELINE_PORT", port))
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def organism_url(text: str) -> str:
    """``text`` as the base URL of an organism: ``HOST:PORT`` means ``http://HOST:PORT``.
    Raises ValueError with a sentence saying what is wrong."""
    text = text.strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"The organism's address must start with http:// or https://, not "
                         f"{parts.scheme}://; for example http://127.0.0.1:8765.")
    try:
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise ValueError(f"The port of {text!r} is not a number from 0 to 65535; for "
                         f"example http://127.0.0.1:8765.") from None
    if not parts.hostname:
        raise ValueError(f"The address {text!r} names no host; for example "
                         f"http://127.0.0.1:8765.")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError(f"Give the organism's address without a path ({parts.scheme}://"
                         f"{parts.netloc}), not {text!r}: commands add /api/v1 themselves.")
    return text


class Client:
    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        import httpx

        self._http = httpx.Client(base_url=self.url + "/api/v1", headers=headers,
                                  timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> Any:
        if response.is_success:
            return response.json()
        try:
            error = response.json()["error"]
            if isinstance(error, str):  # a refused reload answers with its own shape
                code, message = "reload_rejected", error
            else:
                code, message = error["code"], error["message"]
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", f"HTTP {response.status_code}: {response.text[:200]}"
        raise ClientError(response.status_code, code, message)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(0, "unreachable", f"Cannot reach the organism at {self.url} "
                                                f"({exc}); is 'xml-pipeline run' running?"
                              ) from exc
        return self._check(response)

    def get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params={k: v for k, v in params.items()
                                                  if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self._request("POST", path, json=body)

    def inject(self, *, to: str | None, payload: str, thread_id: str | None = None,
               idempotency_key: str | None = None) -> dict[str, str]:
        if to is None:  # a full envelope
            headers = {"Content-Type": "application/xml"}
            if idempotency_key:
                headers["Idempotency-Key"] = idempotency_key
            params = {"thread_id": thread_id} if thread_id else {}
            result: dict[str, str] = self._request("POST", "/inject",
                                                   content=payload.encode("utf-8"),
                                                   headers=headers, params=params)
            return result
        body: dict[str, Any] = {"to": to, "payload": payload}
        if thread_id:
            body["thread_id"] = thread_id
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        result = self.post("/inject", body)
        return result

    def events(self, *, after: int | None = None, thread: str | None = None,
               agent: str | None = None, types: list[str] | None = None,
               on_open: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
        """Follow ``GET /events`` (SSE), yielding each event's JSON object (a ``lagging``
        notice has ``after`` and no ``position``). ``on_open`` is called once the server has
        accepted the stream. Ends when the server ends the stream."""
        params: dict[str, Any] = {"after": after, "thread": thread, "agent": agent}
        if types:
            params["type"] = ",".join(types)
        params = {k: v for k, v in params.items() if v is not None}
        import httpx

        try:
            with self._http.stream("GET", "/events", params=params,
                                   timeout=httpx.Timeout(30.0, read=None)) as response:
                if not response.is_success:
                    response.read()
                    self._check(response)
                if on_open is not None:
                    on_open()
                data: list[str] = []
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        yield json.loads("\n".join(data))
                        data = []
        except httpx.TransportError as exc:
            raise ClientError(0, "unreachable", f"Lost the organism at {self.url} ({exc})."
                              ) from exc
