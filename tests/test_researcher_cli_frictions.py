"""What got in a first-time researcher's way with `python -m researcher` (issue 16), and its fixes:

- a task posted without --site goes to every site and waits for those not online: submit says so, on one line
  of standard error, naming them;
- keygen records the identity file in the config file when asked to (or when the researcher says yes in a
  terminal), without losing the file's other lines, and never replaces another identity file unsaid;
- --identity opens encrypted results on every command that downloads them, over PHT_IDENTITY, over the config
  file's identity_file; a missing identity is one line naming these three;
- `task TASK` shows whether a task is encrypted, each run's state changes with their times, and the files each
  site delivered to a third party.

The commands run against the real registry app (tests/conftest.py's served_app, on SQLite and on PostgreSQL),
with sites that report through the site API as a runner would. What only a compromised registry sends (a site
name with control characters, a delivery the site API would refuse) is written into its database, as
tests/test_researcher_boundaries.py does; so is a site's last poll an hour ago, since the registry reads the
clock itself.
"""

import hashlib
import json
import os
import pty
import re
import select
import stat
import subprocess
import sys
import time
import tomllib

import pyrage
import pytest
import requests
from click.testing import CliRunner

from master import store
from researcher import generate_identity
from researcher.__main__ import cli as researcher_cli
from researcher.__main__ import sites_not_online_warning
from researcher.settings import SettingsError, record_identity_file, with_identity_file
from tests.conftest import ROOT
from tests.test_researcher_boundaries import HOSTILE, HOSTILE_SHOWN, IMAGE, Federation, archive_of, \
    assert_terminal_safe

SHA256_OF_NOTHING = hashlib.sha256(b"").hexdigest()
# A config file as a researcher writes it, comments and all: keygen must keep every line it does not change.
CONFIG_LINES = ['# my registry', 'registry_url = "{url}"  # the consortium\'s', '', 'token = "{token}"']


class Sites(Federation):
    """The test's registry, its researcher and sites that poll, run and deliver as a test tells them."""

    def poll(self, site):
        """site asks for work, as a runner does (and takes its next run, if it has one): the registry sees it
        online."""
        http = requests.Session()
        http.headers["Authorization"] = self._site_tokens[site]
        http.post(f"{self.url}/api/site/claim", json={"wait_seconds": 0}, timeout=10).raise_for_status()

    def last_seen(self, site, seconds_ago):
        with self.engine.begin() as conn:
            conn.execute(store.sites.update().where(store.sites.c.name == site)
                         .values(last_seen_at=time.time() - seconds_ago))

    def deliver_and_finish(self, site, task_id, recipient, name, content):
        """site claims its run, starts it, records the receipt of a file sent to recipient, and completes it."""
        http, run = self._claim(site, task_id)
        runs_url = f"{self.url}/api/site/runs/{run['id']}"
        lease = {"lease_id": run["lease_id"]}
        http.post(f"{runs_url}/start", json={**lease, "image_digest": "sha256:" + "0" * 64},
                  timeout=10).raise_for_status()
        http.post(f"{runs_url}/deliveries", json={**lease, "recipient": recipient, "name": name, "size": len(content),
                                                  "sha256": hashlib.sha256(content).hexdigest()},
                  timeout=10).raise_for_status()
        http.post(f"{runs_url}/finish", json={**lease, "exit_code": 0}, timeout=10).raise_for_status()
        return run["id"]

    def cli(self, *args, **environment):
        """The CLI with this registry's URL and token in the environment, unless a test says otherwise."""
        return run_cli(*args, **{"PHT_REGISTRY_URL": self.url, "PHT_TOKEN": self.researcher_token, **environment})


@pytest.fixture
def sites(app, served_app, make_researcher, make_site):
    return Sites(app, served_app, make_researcher()["Authorization"].split()[1], make_site)


def run_cli(*args, **environment):
    """The CLI in this process, with no settings of ours but those given."""
    env = {"PHT_REGISTRY_URL": None, "PHT_TOKEN": None, "PHT_CONFIG": "/nonexistent/researcher.toml",
           "PHT_IDENTITY": None, **environment}
    return CliRunner().invoke(researcher_cli, [str(arg) for arg in args], env=env, catch_exceptions=False)


def one_line_error(done):
    assert done.exit_code == 1 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def posted(done):
    assert done.exit_code == 0, done.stderr
    return json.loads(done.stdout)


# --- submit without --site ----------------------------------------------------------------------------------


def test_a_task_for_every_site_warns_once_of_those_not_online(sites):
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        sites.add_site(name)
    sites.poll("hospital-a")
    sites.poll("hospital-c")
    sites.last_seen("hospital-c", seconds_ago=3600)

    done = sites.cli("submit", IMAGE, "--no-pin", "--json")
    task = posted(done)  # standard output is the task's JSON alone
    assert sorted(run["site"] for run in task["runs"]) == ["hospital-a", "hospital-b", "hospital-c"]  # every site
    assert done.stderr.startswith("warning: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Never polled the registry: hospital-b." in done.stderr
    assert "Offline now: hospital-c (last seen " in done.stderr and "give --site NAME" in done.stderr
    assert "hospital-a" not in done.stderr

    table = sites.cli("submit", IMAGE, "--no-pin")
    assert table.exit_code == 0 and table.stderr.count("warning: ") == 1 and "hospital-b" in table.stderr
    assert "warning" not in table.stdout


def test_no_warning_when_every_site_is_online_or_the_sites_are_chosen(sites):
    sites.add_site("hospital-a")
    sites.add_site("hospital-b")
    sites.poll("hospital-a")

    chosen = sites.cli("submit", IMAGE, "--no-pin", "--site", "hospital-b")
    assert chosen.exit_code == 0 and chosen.stderr == ""
    sites.poll("hospital-b")
    everyone = sites.cli("submit", IMAGE, "--no-pin")
    assert everyone.exit_code == 0 and everyone.stderr == ""


def test_the_warning_names_a_few_sites_of_thousands():
    task = {"id": 9, "runs": [{"site": f"site-{n:02}"} for n in range(25)]}
    listed = [{"name": f"site-{n:02}", "online": False, "last_seen_at": None} for n in range(25)]
    warning = sites_not_online_warning(task, listed)
    assert "Never polled the registry: " + ", ".join(f"site-{n:02}" for n in range(10)) + " and 15 more" in warning
    assert sites_not_online_warning(task, [{**site, "online": True, "last_seen_at": "2026-12-04T10:00:00"}
                                           for site in listed]) is None


def test_a_hostile_site_name_in_the_warning_reaches_the_terminal_escaped(sites):
    sites.add_site("evil" + HOSTILE)
    done = sites.cli("submit", IMAGE, "--no-pin", "--json")
    assert done.exit_code == 0, done.stderr
    assert_terminal_safe(done.stderr)
    assert done.stderr.count("\n") == 1 and HOSTILE_SHOWN in done.stderr


# --- --identity, PHT_IDENTITY, identity_file -----------------------------------------------------------------


@pytest.fixture
def encrypted_task(sites, tmp_path):
    """A task posted with --encrypt, whose hospital-a result opens with tmp_path/right.txt only."""
    sites.add_site("hospital-a")
    public_key = generate_identity(tmp_path / "right.txt")
    generate_identity(tmp_path / "wrong.txt")
    sites.registry().register_public_key(public_key)
    task = posted(sites.cli("submit", IMAGE, "--no-pin", "--site", "hospital-a", "--encrypt", "--json"))
    recipient = pyrage.x25519.Recipient.from_str(public_key)
    sites.report("hospital-a", task["id"], output=pyrage.encrypt(archive_of({"output.txt": b'{"n": 7}'}), [recipient]),
                 log=pyrage.encrypt(b"done\n", [recipient]))
    return task["id"]


def config_naming(tmp_path, identity):
    config = tmp_path / "researcher.toml"
    config.write_text(f'identity_file = "{identity}"\n')
    return config


@pytest.mark.parametrize("given", [
    {"flag": "right", "environment": "wrong", "config": "wrong"},
    {"environment": "right", "config": "wrong"},
    {"config": "right"},
], ids=["flag-over-environment-and-config", "environment-over-config", "config"])
def test_the_identity_comes_from_the_flag_then_the_environment_then_the_config(sites, encrypted_task, tmp_path,
                                                                                given):
    flag = ["--identity", tmp_path / f"{given['flag']}.txt"] if "flag" in given else []
    environment = {"PHT_IDENTITY": str(tmp_path / f"{given['environment']}.txt")} if "environment" in given else {}
    config = config_naming(tmp_path, tmp_path / f"{given['config']}.txt")

    done = sites.cli("results", encrypted_task, "--json", *flag, PHT_CONFIG=str(config), **environment)
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)[0]["output"] == {"n": 7}


def test_a_lower_source_does_not_win_over_a_higher_one(sites, encrypted_task, tmp_path):
    config = config_naming(tmp_path, tmp_path / "right.txt")
    done = sites.cli("results", encrypted_task, PHT_CONFIG=str(config), PHT_IDENTITY=str(tmp_path / "wrong.txt"))
    assert "does not decrypt with your identity" in one_line_error(done)


def test_without_an_identity_one_line_names_each_way_to_give_it(sites, encrypted_task):
    done = sites.cli("results", encrypted_task)
    error = one_line_error(done)
    assert error.count("is encrypted") == 1
    assert "--identity FILE" in error and "PHT_IDENTITY=FILE" in error
    assert 'identity_file = "FILE" in /nonexistent/researcher.toml' in error


def test_wait_takes_the_identity_too_to_say_why_a_site_failed(sites, tmp_path):
    sites.add_site("hospital-a")
    public_key = generate_identity(tmp_path / "identity.txt")
    sites.registry().register_public_key(public_key)
    task_id = posted(sites.cli("submit", IMAGE, "--no-pin", "--encrypt", "--json"))["id"]
    recipient = pyrage.x25519.Recipient.from_str(public_key)
    sites.report("hospital-a", task_id, log=pyrage.encrypt(b"no table pht:Patient\n", [recipient]), exit_code=2)

    assert "is encrypted" in one_line_error(sites.cli("wait", task_id))
    error = one_line_error(sites.cli("wait", task_id, "--identity", tmp_path / "identity.txt"))
    assert "hospital-a failed" in error and "(log: no table pht:Patient)" in error


def test_an_identity_file_that_is_not_there_is_named_with_where_it_came_from(sites, tmp_path):
    config = config_naming(tmp_path, tmp_path / "gone.txt")
    error = one_line_error(sites.cli("tasks", PHT_CONFIG=str(config)))
    assert f"the identity file {tmp_path / 'gone.txt'} (identity_file in {config}) is not a file" in error
    error = one_line_error(sites.cli("tasks", PHT_IDENTITY=str(tmp_path / "lost.txt")))
    assert "(from PHT_IDENTITY) is not a file" in error
    assert sites.cli("results", 1, "--identity", tmp_path / "lost.txt").exit_code == 2  # a usage error, at once


# --- keygen records the identity file ------------------------------------------------------------------------


def researcher_config(tmp_path, url="https://registry.example.org", token="a-token"):
    config = tmp_path / "config" / "researcher.toml"
    config.parent.mkdir()
    config.write_text("\n".join(CONFIG_LINES).format(url=url, token=token) + "\n")
    return config


def test_keygen_register_save_to_config_then_results_open_with_the_config_alone(sites, tmp_path):
    sites.add_site("hospital-a")
    config = researcher_config(tmp_path, sites.url, sites.researcher_token)
    before = config.read_text()
    only_the_config = {"PHT_REGISTRY_URL": None, "PHT_TOKEN": None, "PHT_CONFIG": None}
    identity = tmp_path / "keys" / "identity.txt"

    made = sites.cli("--config", config, "keygen", identity, "--register", "--save-to-config", **only_the_config)
    assert made.exit_code == 0, made.stderr
    assert made.stdout.startswith("age1") and made.stdout.count("\n") == 1  # the public key alone
    assert config.read_text() == before + f'identity_file = "{identity}"\n'
    assert f"recorded in {config}" in made.stderr

    task_id = posted(sites.cli("--config", config, "submit", IMAGE, "--no-pin", "--encrypt", "--json",
                               **only_the_config))["id"]
    recipient = pyrage.x25519.Recipient.from_str(made.stdout.strip())
    sites.report("hospital-a", task_id, output=pyrage.encrypt(archive_of({"output.txt": b"1"}), [recipient]),
                 log=pyrage.encrypt(b"ok\n", [recipient]))
    done = sites.cli("--config", config, "results", task_id, "--json", **only_the_config)
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)[0]["output"] == 1


def test_keygen_records_nothing_unasked_and_says_how_to_give_the_identity(tmp_path):
    config = researcher_config(tmp_path)
    before = config.read_text()
    for option in ([], ["--no-save-to-config"]):
        identity = tmp_path / f"identity{len(option)}.txt"
        done = run_cli("--config", config, "keygen", identity, *option)
        assert done.exit_code == 0, done.stderr
        assert config.read_text() == before
        assert f"not recorded in {config}: give results --identity {identity}" in done.stderr


def test_keygen_does_not_replace_another_identity_file_unasked(tmp_path):
    config = researcher_config(tmp_path)
    with config.open("a") as file:
        file.write('identity_file = "/elsewhere/identity.txt"  # the laptop\'s\n')
    before = config.read_text()

    done = run_cli("--config", config, "keygen", tmp_path / "new.txt", "--save-to-config")
    error = one_line_error(done)
    assert "names another identity file already (identity_file = /elsewhere/identity.txt)" in error
    assert "--no-save-to-config" in error and "Remove that line" in error
    assert config.read_text() == before and not (tmp_path / "new.txt").exists()  # refused before the key was made


def test_keygen_makes_no_key_it_was_asked_to_record_where_it_cannot(tmp_path):
    config = tmp_path / "researcher.toml"
    config.write_text('"identity_file" = "/old.txt"\n')
    error = one_line_error(run_cli("--config", config, "keygen", tmp_path / "new.txt", "--save-to-config"))
    assert f'put identity_file = "{tmp_path / "new.txt"}" in {config} by hand' in error
    assert not (tmp_path / "new.txt").exists()


def test_keygen_says_when_the_config_names_the_same_file_already(tmp_path):
    identity = tmp_path / "identity.txt"
    config = config_naming(tmp_path, identity)
    done = run_cli("--config", config, "keygen", identity, "--save-to-config")
    assert done.exit_code == 0 and f"names {identity} already" in done.stderr
    assert config.read_text() == f'identity_file = "{identity}"\n'


def keygen_in_a_terminal(config, identity, answer):
    """keygen as a person runs it: standard input and standard error a terminal (a pseudo-terminal here), standard
    output a pipe. answer is typed once its question shows; returns (exit code, what the terminal showed)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "researcher", "--config", str(config), "keygen", str(identity)],
                               stdin=terminal, stderr=terminal, stdout=subprocess.PIPE, cwd=ROOT,
                               env={"PATH": "/usr/bin:/bin", "HOME": str(config.parent)})
    os.close(terminal)
    shown = b""
    try:
        deadline = time.monotonic() + 30
        while b"? [" not in shown:
            readable, _, _ = select.select([controller], [], [], max(0.0, deadline - time.monotonic()))
            assert readable, f"keygen did not ask within 30 s; the terminal showed {shown!r}"
            shown += os.read(controller, 4096)
        os.write(controller, answer.encode() + b"\n")
        process.wait(timeout=30)
        while select.select([controller], [], [], 0)[0]:
            try:
                shown += os.read(controller, 4096)
            except OSError:  # the terminal's other end is closed: all is read
                break
    finally:
        os.close(controller)
        process.stdout.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, shown.decode()


def test_keygen_in_a_terminal_asks_before_recording_and_before_replacing(tmp_path):
    config = tmp_path / "researcher.toml"
    config.write_text('# mine\nregistry_url = "https://registry.example.org"\n')
    first = tmp_path / "first.txt"
    code, shown = keygen_in_a_terminal(config, first, "y")
    assert code == 0 and f"record it in {config}" in shown
    assert config.read_text() == f'# mine\nregistry_url = "https://registry.example.org"\nidentity_file = "{first}"\n'

    code, shown = keygen_in_a_terminal(config, tmp_path / "second.txt", "n")
    assert code == 0 and f"names another identity file, {first}: replace it" in shown and "[y/N]" in shown
    assert tomllib.loads(config.read_text())["identity_file"] == str(first)

    code, shown = keygen_in_a_terminal(config, tmp_path / "third.txt", "y")
    assert code == 0
    assert config.read_text() == (f'# mine\nregistry_url = "https://registry.example.org"\n'
                                  f'identity_file = "{tmp_path / "third.txt"}"\n')


# --- the config file, one line changed -------------------------------------------------------------------------


@pytest.mark.parametrize("before, after", [
    ("", 'identity_file = "/k/id.txt"\n'),
    ('token = "t"', 'token = "t"\nidentity_file = "/k/id.txt"\n'),
    ('token = "t"\r\n', 'token = "t"\r\nidentity_file = "/k/id.txt"\r\n'),
    ('# keys\nidentity_file = "/old.txt"   # the old one\ntoken = "t"\n',
     '# keys\nidentity_file = "/k/id.txt"   # the old one\ntoken = "t"\n'),
    ("  identity_file='C:\\old'#x\n", '  identity_file="/k/id.txt"#x\n'),
    ('identity_file = "a # not a comment"\n', 'identity_file = "/k/id.txt"\n'),
    ('token = """\nidentity_file = "inside a string"\n"""\n',
     'token = """\nidentity_file = "inside a string"\n"""\nidentity_file = "/k/id.txt"\n'),
], ids=["empty", "no-final-newline", "crlf", "replaced-comment-kept", "literal-string", "hash-in-string",
        "look-alike-in-a-multi-line-string"])
def test_identity_file_is_set_on_one_line_and_every_other_line_stays(before, after):
    assert with_identity_file(before, "/k/id.txt", "researcher.toml") == after


@pytest.mark.parametrize("path", ['/a "quoted"/id.txt', "C:\\keys\\id.txt", "/tab\there/\x7f/é/id.txt"])
def test_any_path_is_written_as_a_toml_string_that_reads_back(path):
    assert tomllib.loads(with_identity_file('token = "t"\n', path, "researcher.toml")) == {
        "token": "t", "identity_file": path}


@pytest.mark.parametrize("before, problem", [
    ('"identity_file" = "/old.txt"\n', "cannot tell which line sets identity_file"),
    ('identity_file = """/old.txt"""\n', "cannot tell which line sets identity_file"),
    ("token = \n", "cannot read it as TOML"),
    ('colour = "blue"\n', "unknown setting(s) colour"),
])
def test_a_config_file_it_cannot_rewrite_safely_is_left_to_a_person(before, problem):
    with pytest.raises(SettingsError, match=re.escape(problem)):
        with_identity_file(before, "/k/id.txt", "researcher.toml")


def test_a_path_that_is_not_utf_8_is_left_to_the_environment():
    with pytest.raises(SettingsError, match="not UTF-8.*set PHT_IDENTITY"):
        with_identity_file("", "/not-utf-8-\udcff/id.txt", "researcher.toml")


def test_the_config_file_keeps_its_mode_and_its_link(tmp_path):
    kept = tmp_path / "dotfiles" / "researcher.toml"
    kept.parent.mkdir()
    kept.write_text('token = "t"\n')
    kept.chmod(0o640)
    link = tmp_path / "researcher.toml"
    link.symlink_to(kept)
    record_identity_file(link, "/k/id.txt")
    assert link.is_symlink() and kept.read_text() == 'token = "t"\nidentity_file = "/k/id.txt"\n'
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert sorted(path.name for path in kept.parent.iterdir()) == ["researcher.toml"]  # no temporary file left

    new = tmp_path / "new" / "researcher.toml"
    record_identity_file(new, "/k/id.txt")
    assert stat.S_IMODE(new.stat().st_mode) == 0o600 and new.read_text() == 'identity_file = "/k/id.txt"\n'


# --- task TASK: encryption, state changes, deliveries -----------------------------------------------------------


def table_lines(stdout, first_word):
    return [line.split() for line in stdout.splitlines() if line.split()[:1] == [first_word]]


def test_task_shows_encryption_each_runs_state_changes_and_its_deliveries(sites, tmp_path):
    sites.add_site("hospital-a")
    sites.add_site("hospital-b")
    sites.registry().register_public_key(generate_identity(tmp_path / "identity.txt"))
    task_id = posted(sites.cli("submit", IMAGE, "--no-pin", "--encrypt", "--name", "linkage", "--json"))["id"]
    run_id = sites.deliver_and_finish("hospital-a", task_id, "ttp", "linkage.csv.age", b"x" * 2500)

    shown = sites.cli("task", task_id)
    assert shown.exit_code == 0, shown.stderr
    assert f"task {task_id} (session " in shown.stdout and "encrypted: yes, to 1 public key" in shown.stdout
    assert "name: linkage" in shown.stdout
    states = [line[2] for line in table_lines(shown.stdout, "hospital-a") if line[1].startswith("20")]
    assert states == ["pending", "claimed", "running", "completed"]
    assert [line[2] for line in table_lines(shown.stdout, "hospital-b") if line[1].startswith("20")] == ["pending"]
    [delivery] = [line for line in table_lines(shown.stdout, "hospital-a") if "ttp" in line]
    assert delivery[1:5] == ["ttp", "linkage.csv.age", "2.5", "kB"]

    raw = json.loads(sites.cli("task", task_id, "--json").stdout)
    run = next(run for run in raw["runs"] if run["id"] == run_id)
    assert [event["status"] for event in run["history"]] == states and len(raw["encrypted_to"]) == 1
    assert run["deliveries"][0]["sha256"] == hashlib.sha256(b"x" * 2500).hexdigest()

    plain = sites.cli("submit", IMAGE, "--no-pin", "--site", "hospital-b")
    listed = sites.cli("tasks")
    assert [line[-2] for line in table_lines(listed.stdout, str(task_id))] == ["yes"]
    plain_id = plain.stdout.split()[1]
    assert [line[-2] for line in table_lines(listed.stdout, plain_id)] == ["no"]
    unencrypted = sites.cli("task", plain_id)
    assert "encrypted: no" in unencrypted.stdout and "no files delivered to a third party" in unencrypted.stdout


def test_task_shows_what_a_hostile_registry_sends_escaped(sites):
    site = "evil" + HOSTILE
    sites.add_site(site)
    task_id = posted(sites.cli("submit", IMAGE, "--no-pin", "--name", HOSTILE, "--json"))["id"]
    run_id = sites.report(site, task_id, log=b"log\n", exit_code=1, failure_reason=HOSTILE)
    with sites.engine.begin() as conn:
        conn.execute(store.deliveries.insert().values(run_id=run_id, recipient=HOSTILE, name=HOSTILE, size=1,
                                                      sha256=SHA256_OF_NOTHING, at=time.time()))

    shown = sites.cli("task", task_id)
    assert shown.exit_code == 0, shown.stderr
    assert_terminal_safe(shown.stdout)
    assert f"name: {HOSTILE_SHOWN}" in shown.stdout
    as_json = sites.cli("task", task_id, "--json")
    assert "\x1b" not in as_json.stdout and json.loads(as_json.stdout)["runs"][0]["deliveries"][0]["name"] == HOSTILE


# --- what a hostile registry's odd shapes do to the new commands -----------------------------------------

@pytest.mark.parametrize("sites", [
    [{"name": "hospital-a", "last_seen_at": None}],  # no "online"
    [{"name": ["hospital-a"], "online": False, "last_seen_at": None}],
    ["hospital-a", None, 7],
    [{"name": "hospital-a", "online": False, "last_seen_at": [1, 2]}],
])
def test_an_odd_site_list_never_stops_the_warning(sites):
    task = {"id": 3, "runs": [{"site": "hospital-a"}, {"site": ["x"]}, "not a run"]}
    warning = sites_not_online_warning(task, sites)
    assert warning is None or warning.startswith("task 3 went to every site")


@pytest.mark.parametrize("task, problem", [
    ({"runs": "abc"}, "its runs are not a list of records"),
    ({"runs": [{"id": "1", "site": "a"}]}, "a run has no whole-number id and site name"),
    ({"runs": [{"id": 1, "site": ["a"]}]}, "a run has no whole-number id and site name"),
])
def test_runs_the_task_command_cannot_ask_about_are_named(task, problem):
    from researcher.__main__ import runs_shape_problem
    assert runs_shape_problem(task).startswith(problem)


@pytest.mark.parametrize("task, runs, problem", [
    ({"encrypted_to": 5}, [], "encrypted_to is not a list"),
    ({}, [{"id": 1, "history": {"a": 1}}], "run 1's history is not a list of records"),
    ({}, [{"id": 1, "history": ["x"]}], "run 1's history is not a list of records"),
    ({}, [{"id": 1, "history": [], "deliveries": "abc"}], "run 1's deliveries is not a list of records"),
])
def test_a_task_the_task_command_cannot_show_is_named(task, runs, problem):
    from researcher.__main__ import task_shape_problem
    assert task_shape_problem(task, runs).startswith(problem)


def test_a_config_that_cannot_be_written_is_one_error_naming_the_fix(tmp_path):
    with pytest.raises(SettingsError, match=r"cannot write it .*put identity_file = .* there yourself, or set "
                                            r"PHT_IDENTITY"):
        record_identity_file("/proc/self/pht.toml", tmp_path / "identity.txt")
