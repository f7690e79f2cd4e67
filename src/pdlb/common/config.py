"""Command-line flags with environment-variable fallbacks.

Every flag `--foo-bar` of service `svc` falls back to `PDLB_SVC_FOO_BAR`, then to its default;
`--help` shows the variable next to each flag.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection
from typing import Any


class FlagRefused(SystemExit):
    """A flag value a service refuses as it starts: `message` (one line, naming the flag, without
    the program's name, which `run_service` puts before it) goes to stderr and the process exits
    with status 2, as argparse's own refusals do."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose `flag()` reads defaults from PDLB_<SERVICE>_<FLAG> variables.

    Parsed namespaces carry `given_flags`: the dests of the flags written on the command line (not
    defaults, not environment fallbacks), and `env_flags`: dest -> the environment variable that set
    its default, for checks that treat those apart."""

    def __init__(self, service: str, description: str) -> None:
        super().__init__(
            prog=f"pdlb-{service}",
            description=description,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        self.env_prefix = f"PDLB_{service.upper()}_"
        self.env_set: dict[str, str] = {}  # dest -> the variable that set its default
        # variables whose value the flag refuses: reported when the flags are parsed (after
        # --help, which still works), one line after the program's name, exit 2
        self.env_errors: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, rest = super().parse_known_args(args, namespace)
        if self.env_errors:
            self.exit(2, f"{self.prog}: {self.env_errors[0]}\n")
        # Parsed again with every default suppressed: what remains was given on the command line.
        defaults = [(action, action.default) for action in self._actions]
        try:
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            given, _ = super().parse_known_args(args, argparse.Namespace())
        finally:
            for action, default in defaults:
                action.default = default
        parsed.given_flags = frozenset(vars(given))
        parsed.env_flags = dict(self.env_set)
        return parsed, rest

    def env_name(self, flag: str) -> str:
        return self.env_prefix + flag.lstrip("-").replace("-", "_").upper()

    def flag(self, name: str, *, default: Any = None, type: Any = str, help: str, **kw: Any) -> None:
        """Add `--name`, defaulting to the environment variable when it is set."""
        env = self.env_name(name)
        raw = os.environ.get(env)
        if raw is not None:
            try:
                value = _parse_env(raw, type, env)
            except SystemExit as exc:
                self.env_errors.append(str(exc.code))
            else:
                choices = kw.get("choices")
                if choices is not None and value not in choices:
                    self.env_errors.append(f"{env}={raw!r}: expected one of {', '.join(map(str, choices))}")
                else:
                    default = value
                    self.env_set[name.lstrip("-").replace("-", "_")] = env
        if type is bool:
            self.add_argument(
                name,
                default=default,
                action=argparse.BooleanOptionalAction,
                help=f"{help} [env: {env}]",
                **kw,
            )
            return
        self.add_argument(name, default=default, type=_worded(type), help=f"{help} [env: {env}]", **kw)


_PLAIN = {int: "expected an integer", float: "expected a number"}
# what an on/off flag's variable reads as on or off (case and surrounding spaces ignored)
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def integer(text: str) -> int:
    """Any integer, as a flag type: a word is refused as `'abc': expected an integer`."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {_PLAIN[int]}") from None


def number(text: str) -> float:
    """Any float, as a flag type: a word is refused as `'abc': expected a number`."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {_PLAIN[float]}") from None


def _worded(type_: Any) -> Any:
    """int and float as flag types that refuse a word as their variables do (`'abc': expected a
    number`), not in argparse's `invalid float value: 'abc'`; other types as they are."""
    return {int: integer, float: number}.get(type_, type_)


def _parse_env(raw: str, type_: Any, env: str) -> Any:
    if type_ is bool:
        lowered = raw.strip().lower()
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
        raise SystemExit(f"{env}={raw!r}: expected true/false")
    try:
        return type_(raw)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        # int()'s and float()'s own words ("invalid literal for int() with base 10") say less
        plain = _PLAIN.get(type_)
        said = str(exc).removeprefix(f"{raw!r}: ")  # a flag type's own words repeat the value: once is enough
        raise SystemExit(f"{env}={raw!r}: {plain or said}") from exc


# repeatable or informational flags take no single value from one variable
_NO_ENV = (argparse._HelpAction, argparse._VersionAction, argparse._AppendAction, argparse._CountAction)


def env_fallbacks(
    parser: argparse.ArgumentParser, prefix: str, skip: Collection[str] = (), errors: list[str] | None = None
) -> dict[str, str]:
    """Give each `--foo-bar` flag of a plain argparse parser (the `pdlb` command's, whose
    subcommands are not FlagParsers) the fallback FlagParser gives services: the default comes from
    `<prefix>FOO_BAR` when that variable is set, and --help names the variable.

    Skipped: flags whose dest is in `skip`, help/version, and repeatable flags (append, count).
    An on/off flag reads true/false (1/0, yes/no, on/off). A value the flag's type or choices
    refuse raises FlagRefused naming the variable, or with `errors` is appended to it (for a caller
    that refuses after parsing, so that --help still answers). Returns dest -> variable of the flags whose
    default the environment set (a command line flag still wins)."""
    found: dict[str, str] = {}
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if not long or action.dest in skip or isinstance(action, _NO_ENV):
            continue
        env = prefix + long[0][2:].replace("-", "_").upper()
        if action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} [env: {env}]".lstrip()
        raw = os.environ.get(env)
        if raw is None:
            continue
        try:
            if isinstance(action, argparse.BooleanOptionalAction):
                value = _parse_env(raw, bool, env)
            elif action.nargs == 0:  # store_true / store_false / store_const: set means given
                value = action.const if _parse_env(raw, bool, env) else action.default
            else:
                value = _parse_env(raw, action.type, env) if action.type is not None else raw
        except SystemExit as exc:
            refused = str(exc.code)
        else:
            choices = action.choices
            refused = ""
            if choices is not None and value not in choices:
                refused = f"{env}={raw!r}: expected one of {', '.join(map(str, choices))}"
        if refused:
            if errors is None:
                raise FlagRefused(refused)
            errors.append(refused)
            continue
        action.default = value
        found[action.dest] = env
    return found


def csv_list(raw: str) -> list[str]:
    """Parse 'a,b, c' into ['a', 'b', 'c'] (empty string gives [])."""
    return [item.strip() for item in raw.split(",") if item.strip()]


SHUTDOWN_GRACE_S = 10.0  # every service's --shutdown-grace default (pdlb up names it when it stops)


def add_common_flags(parser: FlagParser, *, default_port: int) -> None:
    """Flags every service has: listen address, etcd, shutdown grace and log level."""
    parser.flag("--host", default="127.0.0.1", help="address to listen on")
    parser.flag("--port", default=default_port, type=int, help="gRPC port (0 picks a free one)")
    parser.flag(
        "--advertise-address",
        default="",
        help="host:port others use to reach this service (default: host:bound port)",
    )
    parser.flag(
        "--etcd",
        default="",
        help="etcd endpoint host:port for membership (empty: no etcd, static configuration only)",
    )
    parser.flag("--etcd-prefix", default="/pdlb", help="etcd key prefix of this cluster")
    parser.flag("--lease-ttl", default=5, type=int, help="etcd lease TTL in seconds")
    parser.flag(
        "--shutdown-grace",
        default=SHUTDOWN_GRACE_S,
        type=float,
        help="seconds to drain in-flight work on SIGTERM before cancelling it",
    )
    parser.flag("--log-level", default="INFO", help="logging level")
    from pdlb.common.security import add_etcd_security_flags, add_tls_flags  # security imports this module

    add_tls_flags(parser)
    add_etcd_security_flags(parser)
