"""The web chat page: plain HTML, CSS and JavaScript from `agentbus/gateway/web/`, served at `/`
(no build step, no CDN). See docs/webchat.md."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WEB = Path(__file__).resolve().parent.parent / "web"

# The page loads only its own files and talks only to its own origin.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(WEB / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/chat")
async def chat() -> RedirectResponse:
    return RedirectResponse("/", status_code=308)


class _Secured:
    """Static files with the page's security headers (revalidated on every load, so a new
    version of agentbus is picked up at once)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.decode().lower() not in SECURITY_HEADERS
                ]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self._app(scope, receive, send_with_headers)


def install(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/web/`."""
    app.include_router(router)
    app.mount("/web", _Secured(StaticFiles(directory=WEB)), name="web")
