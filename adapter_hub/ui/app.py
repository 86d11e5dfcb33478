"""The Flask application: one registry opened on first use and shared by the requests, read-only, with every
registry error turned into a page that says it in one line (never a traceback)."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flask import Flask, Response, g, render_template, request, send_file
from werkzeug.exceptions import HTTPException, SecurityError

from ..errors import AdapterHubError, ConfigError
from ..registry import DatabaseUnreachable, Hub, NotFound, RefError, RegistryBusy, SchemaError, StoreMismatch
from ..registry.db import parse_url, sqlite_path
from ..registry.render import visible
from .pages import pages

# Scripts only from this server (no inline script runs; chart data travels in data- attributes); plotly.js
# sets inline styles, and the lineage SVG is inline markup.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")  # fmt: skip
# The Host names a server bound to a loopback address answers (any port): a page of another site whose name
# its DNS points at 127.0.0.1 (DNS rebinding) sends its own name as the Host, and gets 400 instead of the registry.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


class Unavailable(AdapterHubError):
    """The registry cannot be read (no database, an outdated schema, another registry's store, …)."""


class Registry:
    """Opens the registry on first use and keeps it; a registry that cannot be opened is tried again on the
    next request, so that fixing it (`adapter-hub db upgrade`) and reloading the page is enough."""

    def __init__(self, home: str | Path | None, db: str | None, hub: Hub | None = None,
                 open_options: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.home, self.db = home, db
        self.open_options = dict(open_options or {})  # more keywords of Hub.open (an artifact store, …)
        self._hub = hub
        self._owned = hub is None  # a Hub handed in is its owner's to close
        self._lock = threading.Lock()

    def hub(self) -> Hub:
        with self._lock:
            if self._hub is None:
                self._hub = self._open()
            return self._hub

    def _open(self) -> Hub:
        try:
            home, url = Hub.locate(self.home, self.db)
            path = sqlite_path(parse_url(url))
            if path is not None and (not path.is_file() or path.stat().st_size == 0):
                # the web view never creates a registry: a missing file is most likely a wrong --home / --db
                raise Unavailable(
                    f"there is no registry database at {path}: check --home / --db (or ADAPTER_HUB_HOME / "
                    "ADAPTER_HUB_DB), or create one with `adapter-hub db upgrade` or `adapter-hub demo`"
                )
            return Hub.open(home, url, create=False, **self.open_options)
        except Unavailable:
            raise
        except AdapterHubError as exc:
            raise Unavailable(str(exc)) from None

    def close(self) -> None:
        with self._lock:
            if self._hub is not None and self._owned:
                self._hub.close()
                self._hub = None


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _number(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}g}"


def _href(prefix: str) -> Callable[..., str]:
    """A URL builder for links a page repeats a thousand times: url_for's rule matching costs ~30 µs a call,
    this ~2 µs; the names are quoted (a database edited by another tool may hold any text)."""

    def build(*parts: str) -> str:
        return request.script_root + prefix + "/".join(quote(p, safe="/:@") for p in parts)

    return build


def is_loopback(host: str) -> bool:
    """Whether HOST (an address or name to listen on) answers this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def trusted_hosts(host: str) -> list[str] | None:
    """The Host names a server listening on HOST answers: the loopback names (and HOST itself) when HOST is a
    loopback address, any (None) otherwise: whoever the server is bound for may name it as they like."""
    if not is_loopback(host):
        return None
    shown = f"[{host}]" if ":" in host else host
    return list(dict.fromkeys((*LOOPBACK_HOSTS, shown.lower())))


def create_app(home: str | Path | None = None, db: str | None = None, *, hub: Hub | None = None,
               open_options: Mapping[str, Any] | None = None,
               hosts: Sequence[str] | None = LOOPBACK_HOSTS) -> Flask:  # fmt: skip
    """The web view of the registry at HOME / DB (as `Hub.open` finds it, with OPEN_OPTIONS), or of an open HUB.
    A request whose Host is not one of HOSTS (any port; None: any host) is answered 400."""
    app = Flask(__name__)
    app.config["TRUSTED_HOSTS"] = list(hosts) if hosts is not None else None
    app.config["REGISTRY"] = Registry(home, db, hub, open_options)
    app.jinja_env.filters.update(when=_when, size=_size, number=_number, visible=visible)
    app.jinja_env.globals.update(version_href=_href("/versions/"), adapter_href=_href("/adapters/"),
                                 task_href=_href("/tasks/"), lineage_href=_href("/lineage/"))  # fmt: skip
    app.register_blueprint(pages)

    @app.get("/assets/plotly.min.js")
    def plotly_js() -> Response:
        # plotly.js as the installed plotly package ships it: the pages need nothing from the network
        path = resources.files("plotly") / "package_data" / "plotly.min.js"
        with resources.as_file(path) as file:
            return send_file(file, mimetype="text/javascript", max_age=86400)

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if "started" in g:
            response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - g.started) * 1000:.1f}"
        return response

    def message(status: int, title: str, text: str) -> tuple[str, int]:
        return render_template("message.html", title=title, message=visible(text, 2000)), status

    @app.errorhandler(Unavailable)
    def _unavailable(exc: Unavailable) -> tuple[str, int]:
        return message(503, "Registry unavailable", str(exc))

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound) -> tuple[str, int]:
        return message(404, "Not found", str(exc))

    @app.errorhandler(RefError)
    def _bad_ref(exc: RefError) -> tuple[str, int]:
        return message(404, "Not found", str(exc))

    @app.errorhandler(AdapterHubError)
    def _refused(exc: AdapterHubError) -> tuple[str, int]:
        if isinstance(exc, (DatabaseUnreachable, RegistryBusy, SchemaError, StoreMismatch)):
            return message(503, "Registry unavailable", str(exc))  # the registry's state, not the request
        return message(400, "Refused", str(exc))

    @app.errorhandler(SecurityError)
    def _untrusted_host(exc: SecurityError) -> Response:
        # plain text: without a trusted Host no URL can be built, so no page template can be rendered
        text = "400 Bad Request: this server answers only to the host names of the address it listens on\n"
        return Response(text, status=400, mimetype="text/plain")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[str, int]:
        return message(exc.code or 500, exc.name, f"{exc.description} ({request.path})")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[str, int]:
        app.logger.exception("unexpected error on %s", request.path)
        return message(500, "Unexpected error", f"unexpected {type(exc).__name__}: {exc} — a defect in adapter-hub")

    return app


def serve(home: str | Path | None, db: str | None, *, host: str, port: int, say: Callable[[str], Any] = print,
          open_options: Mapping[str, Any] | None = None) -> None:  # fmt: skip
    """Serve the web view until interrupted (Ctrl-C). The registry is only read."""
    import socket
    from importlib.util import find_spec

    from werkzeug.serving import get_sockaddr, make_server, select_address_family

    # The socket is bound here, so that an address in use or a host that does not resolve is our one-line
    # error (werkzeug prints its own lines and exits when it binds).
    _home, url = Hub.locate(home, db)  # a malformed --db or --home is refused here, in one line
    parse_url(url)
    if find_spec("plotly") is None:  # the compare page's charts are drawn by the plotly.js it ships
        raise ConfigError("adapter-hub ui needs plotly: pip install 'flask>=3' 'plotly>=5'")
    family = select_address_family(host, port)
    try:
        listening = socket.socket(family, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listening.bind(get_sockaddr(host, port, family))
            listening.listen(128)
        except BaseException:
            listening.close()
            raise
    except (OSError, OverflowError, ValueError) as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    app = create_app(home, db, open_options=open_options, hosts=trusted_hosts(host))
    try:
        app.config["REGISTRY"].hub()
    except Unavailable as exc:
        say(f"warning: {visible(str(exc), 2000)} (the pages say so until it is fixed)")
    with listening:
        server = make_server(host, port, app, threaded=True, fd=listening.fileno())
    shown = f"[{host}]" if ":" in host else host
    say(f"serving the registry read-only at http://{shown}:{server.socket.getsockname()[1]}/ (Ctrl-C stops)")
    if not is_loopback(host):
        say(f"warning: listening on {host}: anyone who can reach this machine can read the registry")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.config["REGISTRY"].close()
