"""What the site runner's log tells a hospital's IT officer (issue 16): at start, what the site allows; once
online, that it waits for work; while the registry is away, one line per problem, not one per attempt and never
urllib3's exception chains or a traceback; when it answers again, one line.

The summary and the wording of problems are pure functions, tested here without servers. The rest drives the
real runner process (client/runScript.py) against tests/fake_registry.py, as tests/test_hostile_registry.py
does, with a switch in front of it for a registry that goes away (connections refused) and comes back on the
same port.
"""

import json
import re
import signal
import socket

import docker
import pytest
import requests

from client import containers
from client.registry_client import Outage, RegistryClient, connection_problem
from client.runner import (claim_wait_seconds, registry_problem, size_in_words, startup_summary, startup_warnings,
                           whitelist_warnings)
from client.site_config import load_site_config, parse_site_config
from common.printable import escaped
from scripts.federation import DEFAULT_WHITELIST, free_port
from tests.conftest import ROOT
from tests.fake_registry import Answer, FakeRegistry
from tests.tcp_switch import Switch
from tests.test_hostile_registry import LOG_RECORD, Runner, claim, probe, sparql_endpoint  # noqa: F401 (fixtures)
from tests.test_site_config import TTP_KEY, VALID

SITE = "hospital-l"
TIGHT = r"127\.0\.0\.1:5050/pht/[a-z0-9-]+(:[A-Za-z0-9_.-]+)?(@sha256:[0-9a-f]{64})?"  # config.json's
# What the runner must never write: urllib3's exception chains, object reprs, tracebacks.
DUMPS = ("Traceback", "urllib3", "HTTPConnectionPool", "Max retries", "object at 0x", "Caused by")


# --- the start-up summary ----------------------------------------------------------------------------------

def test_the_summary_names_what_the_site_allows():
    config = parse_site_config({
        **VALID, "site_name": "hospital-a", "whitelist": [TIGHT], "require_digest": False, "max_concurrent_runs": 3,
        "approval_policy": "approve_new_digests",
        "airlock": {"review": True, "max_file_bytes": 1024 ** 2, "allowed_suffixes": [".csv", ".json"],
                    "check_command": ["/opt/site/check-output"], "check_timeout_seconds": 30},
        "recipients": {"ttp": {"url": "https://ttp.example.org:5001", "public_key": TTP_KEY, "token": "t"}},
        "researcher_keys": {"alice": TTP_KEY, "bob": [TTP_KEY, TTP_KEY]},
        "container": {"memory": "512m", "cpus": 2, "pids": 64, "timeout_seconds": 600,
                      "max_output_bytes": 5 * 1024 ** 2, "max_temp_bytes": 123456789}})
    assert startup_summary(config) == [
        "site hospital-a: runner started (pht-runner/0.3), registry http://127.0.0.1:5000, long-poll 50 s",
        'whitelist ["127\\\\.0\\\\.0\\\\.1:5050/pht/[a-z0-9-]+(:[A-Za-z0-9_.-]+)?(@sha256:[0-9a-f]{64})?"]: an image '
        "runs only if a pattern matches its whole reference; require_digest false: tags run too, pulled and then run "
        "by the digest pulled",
        "container.network none: algorithms have no network; they reach http://127.0.0.1:7878/query only through "
        "each run's read-only SPARQL gateway",
        "approval_policy approve_new_digests: an image digest runs once the IT officer approved it (runScript.py "
        "approvals); airlock: results wait at the site until the IT officer releases them (runScript.py outputs), "
        'checked: each file at most 1 MiB, file names ending in [".csv", ".json"], check command '
        '["/opt/site/check-output"] (at most 30 s)',
        "recipients (files sent straight there, encrypted to the key pinned for each): ttp at "
        "https://ttp.example.org:5001",
        "researcher_keys pinned for 2 researcher(s): alice (1 key), bob (2 keys); a task asking for any other key is "
        "refused",
        "up to 3 run(s) at once; each algorithm gets 512m of memory, 2 CPU(s), 64 processes and 600 s, /output 5 MiB "
        "in 100000 files, /temp 123456789 bytes in 100000 files per session (disk_limits filesystem); task inputs "
        "up to 16 MiB",
    ]


def test_the_summary_of_the_defaults_says_what_is_not_set():
    summary = "\n".join(startup_summary(parse_site_config(VALID)))
    assert "require_digest true: only images pinned by digest (@sha256:...) run" in summary
    assert "approval_policy whitelist: an image the whitelist allows runs at once; airlock: results leave when the " \
           "run ends, no automatic checks" in summary
    assert "recipients: none (a run whose algorithm addresses files to a third party fails)" in summary
    assert "researcher_keys not pinned: encrypted results are encrypted to the keys the registry sends" in summary
    assert "researcher_keys pinned for 0 researcher(s); a task" in "\n".join(
        startup_summary(parse_site_config({**VALID, "researcher_keys": {}})))


def test_every_value_in_the_summary_and_the_warnings_is_escaped():
    hostile = "\x1b]0;title\x07\r\n2026-01-01 00:00:00,000 INFO forged\u202e"
    config = parse_site_config({
        **VALID, "site_name": hostile, "registry_url": f"http://registry.example.org/{hostile}",
        "sparql_endpoint": f"http://127.0.0.1:7878/{hostile}", "whitelist": [TIGHT, f"{hostile}.*"],
        "recipients": {"ttp": {"url": f"http://ttp.example.org/{hostile}", "public_key": TTP_KEY, "token": "t"}},
        "researcher_keys": {hostile: TTP_KEY}, "container": {"network": hostile, "memory": "1g"}})
    lines = startup_summary(config) + startup_warnings(config)
    for line in lines:
        assert escaped(line) == line, line  # no control character left to spell out
        assert "\u202e" not in line and "\n" not in line
    shown = "\n".join(lines)
    assert shown.count("\\x1b]0;title\\x07\\x0d\\x0a2026-01-01") >= 8, shown  # site, URLs, network, researcher
    assert "\\u001b]0;title\\u0007" in shown  # the whitelist, as JSON


def test_warnings_name_the_risks_of_the_config():
    config = parse_site_config({**VALID, "registry_url": "http://registry.example.org", "allow_host_network": True,
                                "whitelist": [TIGHT, r"127\.0\.0\.1:5050/pht/.*", ".*"],
                                "container": {"network": "host"}})
    warnings = startup_warnings(config)
    assert warnings[0].startswith("http://registry.example.org is plain HTTP")
    assert warnings[1].startswith("container.network is host (allow_host_network)")
    assert warnings[2].startswith('whitelist[1] "127\\\\.0\\\\.0\\\\.1:5050/pht/.*" admits repositories nested below '
                                  "127.0.0.1:5050/pht/, such as 127.0.0.1:5050/pht/someone-else/x:")
    assert warnings[3].startswith('whitelist[2] ".*" admits images from any registry, such as attacker.invalid/x:')
    assert len(warnings) == 4
    assert startup_warnings(parse_site_config({**VALID, "whitelist": [TIGHT]})) == []


def test_the_whitelist_warnings_are_those_of_the_image_policy():
    whitelist = [re.compile(pattern) for pattern in (TIGHT, r"registry.example.org/pht/summary")]
    [warning] = whitelist_warnings(whitelist)
    assert warning.startswith('whitelist[1] "registry.example.org/pht/summary" admits look-alike registries, such as '
                              "registryxexample.org/pht/summary:")


@pytest.mark.parametrize("size, words", [
    (1024 ** 3, "1 GiB"), (16 * 1024 ** 2, "16 MiB"), (64 * 1024, "64 KiB"), (1000, "1000 bytes"), (0, "0 bytes"),
    (1024 ** 3 + 1, "1073741825 bytes")])
def test_sizes_read_as_people_write_them(size, words):
    assert size_in_words(size) == words


# --- problems, in words --------------------------------------------------------------------------------------

@pytest.fixture
def registry():
    registry = FakeRegistry(SITE)
    yield registry
    registry.stop()


def failure_of(url, what=lambda client: client.heartbeat(1, "lease-1")):
    """The exception a runner's request to url really raises."""
    client = RegistryClient(url, "a-token")
    with pytest.raises(requests.RequestException) as caught:
        what(client)
    return caught.value


def test_a_refused_connection_is_named_not_dumped():
    error = failure_of(f"http://127.0.0.1:{free_port()}")
    assert "HTTPConnectionPool" in str(error)  # what used to reach the log
    assert connection_problem(error) == "connection refused"


def test_an_answer_that_does_not_come_is_named():
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        client = RegistryClient(f"http://127.0.0.1:{silent.getsockname()[1]}", "a-token")
        with pytest.raises(requests.RequestException) as caught:
            client._answer("GET", "/api/site/me", 0.5)
        assert connection_problem(caught.value) == "no answer in time"
    finally:
        silent.close()


@pytest.mark.parametrize("answer, words", [
    (Answer.raw_bytes(b""), "the connection closed without an answer"),
    (Answer.raw_bytes(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"), "its answer is not HTTP"),
    (Answer(307, b"", (("Location", "http://elsewhere.invalid/"),)),
     "it answers with a redirect, which is not followed"),
    (Answer.raw_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}"),
     "the answer could not be read: the answer was cut short"),
])
def test_what_a_broken_answer_does_is_named(registry, answer, words):
    registry.script("heartbeat", answer)
    assert connection_problem(failure_of(registry.url)) == words


def test_a_registry_problem_names_the_registry_and_what_happened(registry):
    url = f"http://127.0.0.1:{free_port()}"
    assert registry_problem(failure_of(url), url) == f"registry unreachable at {url}: connection refused"
    registry.script("heartbeat", Answer.raw_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}"))
    assert registry_problem(failure_of(registry.url), registry.url) == (
        f"registry at {registry.url}: the answer could not be read: the answer was cut short")


def test_an_outage_is_said_when_it_begins_changes_and_every_few_minutes_and_its_end_once():
    outage = Outage(remind_seconds=600)
    assert outage.failed("connection refused", now=1000) == "connection refused"
    assert outage.failed("connection refused", now=1001) is None
    assert outage.failed("connection refused", now=1599) is None
    assert outage.failed("no answer in time", now=1600) == "no answer in time"
    assert outage.failed("no answer in time", now=2199) is None
    assert outage.failed("no answer in time", now=2200) == "no answer in time (for 20 min now)"
    assert outage.answered() is True
    assert outage.answered() is False
    assert outage.failed("no answer in time", now=2300) == "no answer in time"  # a new outage


def test_a_problem_whose_words_change_at_every_attempt_is_said_at_most_once_a_minute():
    """A registry whose 503 message counts its requests, or a link that fails two ways in turn, every second for
    ten minutes: the first and the first change at once, then a change a minute, not six hundred lines."""
    outage = Outage(remind_seconds=600, change_seconds=60)
    said_at = [second for second in range(600)
               if outage.failed(f"registry: 503 busy (request {second})" if second % 2 else "connection reset", second)]
    assert said_at == [0, 1, *range(61, 600, 60)]


@pytest.mark.parametrize("long_poll, online, once, person_awaited, wait", [
    (30, False, False, None, 0),  # at start, and after a problem: the log says at once whether the registry answers
    (30, True, False, None, 30),
    (30, False, True, None, 30),  # --once polls once, as long as it may
    (0, True, False, None, 0),
    # While a run waits for the IT officer, their decision is acted on within the poll interval (whole seconds: the
    # registry takes whole ones), not only once a long-poll ends.
    (50, True, False, 5, 5),
    (50, True, False, 0.2, 1),
    (2, True, False, 5, 2),
])
def test_a_claim_waits_once_the_runner_is_online(long_poll, online, once, person_awaited, wait):
    assert claim_wait_seconds(long_poll, online, once, person_awaited) == wait


# --- the runner's own log ----------------------------------------------------------------------------------------

def start_runner(tmp_path, registry_url, fake, sparql_endpoint, **settings):
    config = {"registry_url": registry_url, "site_name": SITE, "site_token": "the-site-token",
              "sparql_endpoint": sparql_endpoint, "whitelist": DEFAULT_WHITELIST, "work_dir": str(tmp_path / "work"),
              "long_poll_seconds": 1, "poll_interval_seconds": 0.2, "container": {"timeout_seconds": 120}, **settings}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    return Runner(config_path, tmp_path / "runner", [], fake)


@pytest.fixture
def runners(tmp_path):
    """Runner processes a test starts, stopped at its end, with the containers of their work folder."""
    started = []
    yield started
    for runner in started:
        runner.stop()
    engine = docker.from_env()
    for container in containers.containers_of(engine, SITE, tmp_path / "work"):
        containers.remove(engine, container.id)


def algorithm_runs(work_dir):
    return any(container.status == "running" and containers.ROLE_LABEL not in container.labels
               for container in containers.containers_of(docker.from_env(), SITE, work_dir))


def log_lines(runner, *words):
    """The runner's log lines with all these words."""
    return [line for line in runner.stderr_lines if all(word in line for word in words)]


def assert_one_line_records_only(runner):
    """Every line the runner wrote is a log record of its own: no traceback, no exception chain from urllib3."""
    for dump in DUMPS:
        assert dump not in runner.output, f"{dump!r} in the runner's log:\n{runner.output[-6000:]}"
    strays = [line for line in runner.stderr_lines if not LOG_RECORD.match(line)]
    assert not strays, f"lines that are no log record of their own: {strays}"


def test_the_runner_says_what_it_allows_then_once_that_it_is_online(tmp_path, registry, sparql_endpoint, runners):
    runner = start_runner(tmp_path, registry.url, registry, sparql_endpoint, whitelist=[TIGHT, ".*"],
                          approval_policy="approve_every_task", airlock={"review": True})
    runners.append(runner)
    online = f"online at {registry.url}, waiting for work"
    runner.wait_for_log(online, "the runner says it is online")
    # A malformed header in an answer: urllib3 warns of it with a traceback, which must not reach the log.
    registry.offer_claim(Answer.raw_bytes(b"HTTP/1.1 204 No Content\r\nnot a header line\r\n\r\n"),
                         label="malformed header")
    runner.wait_for(lambda: len(registry.claim_requests_after("malformed header")) >= 3,
                    "the runner polls three times more")

    claims = registry.requests("claim")
    assert claims[0].json["wait_seconds"] == 0, "the first claim waits for no work, so the log says at once"
    assert {claim.json["wait_seconds"] for claim in claims[1:]} == {1}
    assert len(log_lines(runner, online)) == 1 and not log_lines(runner, "answers again")
    summary = startup_summary(load_site_config(runner.config_path))
    logged = [line.split(": ", 1)[1] for line in runner.stderr_lines if LOG_RECORD.match(line)]
    assert logged[:len(summary)] == summary, "the summary opens the log"
    [warning] = log_lines(runner, "WARNING", "whitelist[")
    assert 'whitelist[1] ".*" admits images from any registry, such as attacker.invalid/x:' in warning
    assert_one_line_records_only(runner)
    assert runner.stop() == 0


def test_a_whitelist_taken_up_again_is_warned_of(tmp_path, registry, sparql_endpoint, runners):
    runner = start_runner(tmp_path, registry.url, registry, sparql_endpoint, whitelist=[TIGHT])
    runners.append(runner)
    runner.wait_for_log("waiting for work", "the runner is online")
    assert not log_lines(runner, "whitelist[")
    config = json.loads(runner.config_path.read_text())
    runner.config_path.write_text(json.dumps({**config, "whitelist": [TIGHT, r"127\.0\.0\.1:5050/.*"]}))
    runner.process.send_signal(signal.SIGHUP)
    warning = 'whitelist[1] "127\\\\.0\\\\.0\\\\.1:5050/.*" admits any repository on 127.0.0.1:5050, nested ones too'
    runner.wait_for_log(warning, "the runner warns of the pattern it took up")
    assert len(log_lines(runner, "config taken up again")) == 1
    assert len(log_lines(runner, "WARNING", warning)) == 1
    assert_one_line_records_only(runner)
    assert runner.stop() == 0


def problem_lines(runner, what):
    """The problems the runner logged for one of its activities (lines with what), in order."""
    return [line.split(": ", 1)[1] for line in log_lines(runner, "WARNING", what)]


def assert_said_once_each(lines, what):
    """A problem is said again only once another came between (or after minutes): never at each retry."""
    assert lines, f"no problem logged for {what}"
    repeated = [line for before, line in zip(lines, lines[1:]) if line == before]
    assert not repeated, f"{what}: said again at a retry: {repeated}"


@pytest.fixture
def switch(registry):
    switch = Switch(int(registry.url.rsplit(":", 1)[1]))
    yield switch
    switch.turn_off()


def test_a_registry_away_and_back_is_one_line_each(tmp_path, registry, switch, sparql_endpoint, probe, runners):
    url = switch.url
    # Two runs at once: the main loop goes on claiming while run 7's container runs.
    runner = start_runner(tmp_path, url, registry, sparql_endpoint, max_concurrent_runs=2)
    runners.append(runner)
    runner.wait_for_log(f"online at {url}, waiting for work", "the runner is online")
    registry.script("input", Answer.text(json.dumps({"sleep": 4})), run_id=7)
    registry.offer_claim(claim(7, probe, lease_seconds=3))  # a heartbeat every second
    runner.wait_for(lambda: algorithm_runs(tmp_path / "work"), "run 7's container runs")

    # Away: every connection refused.
    switch.turn_off()
    refused = f"registry unreachable at {url}: connection refused"
    for what in (f"heartbeat for run 7 failed: {refused}", f"{refused}; asking again every 0.2 s",
                 f"upload of the output of run 7: {refused}; retrying for up to 600 s"):
        runner.wait_for_log(what, f"the runner logs {what!r}", timeout=60)

    # Reached, but every answer cut short: counted here, so that retries are known to have failed alike.
    defaults = dict(registry.defaults)
    for kind in ("claim", "heartbeat", "output"):
        registry.defaults[kind] = Answer.raw_bytes(b"")
    before = {kind: len(registry.requests(kind)) for kind in ("claim", "heartbeat", "output")}
    switch.turn_on()
    runner.wait_for(lambda: all(len(registry.requests(kind)) >= before[kind] + 3 for kind in ("claim", "heartbeat"))
                    and len(registry.requests("output")) >= before["output"] + 2,
                    "claims, heartbeats and uploads fail again, each several times", timeout=60)

    # Back.
    registry.defaults = defaults
    runner.wait_for(lambda: registry.requests("finish", run_id=7), "run 7 is reported", timeout=60)
    back = f"registry {url} answers again; waiting for work"
    runner.wait_for_log(back, "the runner says the registry answers again")
    label = registry.offer_claim(Answer.no_content())
    runner.wait_for(lambda: len(registry.claim_requests_after(label)) >= 2, "the runner polls on")

    [report] = registry.bodies("finish", run_id=7)
    assert (report["exit_code"], report["failure_reason"]) == (0, None)
    for what in ("heartbeat for run 7 failed: ", "upload of the output of run 7: ", "; asking again every 0.2 s"):
        lines = problem_lines(runner, what)
        assert_said_once_each(lines, what)
        assert sum("connection refused" in line for line in lines) == 1, lines
        # Said when the answers were first cut short; once more if a request cut by the switch said it before.
        assert 1 <= sum("the connection closed without an answer" in line for line in lines) <= 2, lines
    assert len(log_lines(runner, back)) == 1
    assert len(log_lines(runner, "online at")) == 1
    assert len(log_lines(runner, "heartbeat for run 7: the registry answers again")) <= 1
    assert_one_line_records_only(runner)
    assert runner.stop() == 0


def test_the_summary_shown_in_the_docs_is_the_runners():
    section = (ROOT / "docs" / "site-operations.md").read_text().partition("## What the runner's log says")[2]
    documented = [line.removeprefix("INFO MainThread: ")
                  for line in section.partition("```\n")[2].partition("\n```")[0].splitlines()]
    config = parse_site_config({
        **VALID, "site_name": "hospital-a", "registry_url": "https://registry.example.org", "whitelist": [TIGHT],
        "max_concurrent_runs": 2, "approval_policy": "approve_new_digests",
        "airlock": {"review": True, "allowed_suffixes": [".csv", ".json"]},
        "recipients": {"ttp": {"url": "https://ttp.example.org:5001", "public_key": TTP_KEY, "token": "t"}},
        "researcher_keys": {"alice": TTP_KEY}})
    assert documented == startup_summary(config)
