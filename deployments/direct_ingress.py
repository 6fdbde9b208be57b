"""Where an app's routers answer on their own ports (Serve's direct ingress, on one machine).

With ``constants.LOCAL_ENV`` each router replica serves HTTP itself on the lowest free port from
``DIRECT_INGRESS_PORT``, beside Serve's proxy (8000 for ``make serve``). The two ports speak the
same API with the same checks (API key, limits, deadlines, disconnects); the router's own port
skips one process per request and per streamed chunk. Serve hands the port out when the replica
starts, so a router restarted while its predecessor still drains gets the next one: callers ask
here instead of assuming 30000. A replica answers ``GET /-/routes`` with ``{route_prefix: app}``.

    python -m deployments.direct_ingress [APP]    # prints the URLs, one per router replica
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request

from deployments.app import DEFAULT_APP_NAME
from deployments.constants import DIRECT_INGRESS_PORT

SCAN_PORTS = 64  # one port per router replica on this machine, plus those still draining


def direct_urls(
    app: str = DEFAULT_APP_NAME, host: str = "127.0.0.1", first_port: int = DIRECT_INGRESS_PORT
) -> list[str]:
    """Base URLs (route prefix included) of ``app``'s routers that serve on their own port, from
    ``first_port`` (a Ray started with another RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT); empty
    without direct ingress. A closed port costs a refused connect, so scanning is instant."""
    urls = []
    for port in range(first_port, first_port + SCAN_PORTS):
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/-/routes", timeout=2) as response:
                routes = json.loads(response.read())
        except (OSError, ValueError):  # refused, draining (503), or not a Serve replica
            continue
        if isinstance(routes, dict):
            urls += [f"http://{host}:{port}{prefix.rstrip('/')}" for prefix, name in routes.items() if name == app]
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("app", nargs="?", default=DEFAULT_APP_NAME, help="Serve application name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--first-port", type=int, default=DIRECT_INGRESS_PORT)
    args = parser.parse_args()
    urls = direct_urls(args.app, args.host, args.first_port)
    if not urls:
        raise SystemExit(f"no router of app {args.app!r} serves on its own port (ports {args.first_port}+)")
    print("\n".join(urls))


if __name__ == "__main__":
    main()
