"""The researcher's command line, over the same library a script would use.

    python -m researcher sites
    python -m researcher submit IMAGE --input-file config.json --site hospital-a --site hospital-b
    python -m researcher wait TASK
    python -m researcher results TASK --output-dir results/ [--identity ~/.config/pht/identity.txt]
    python -m researcher task TASK
    python -m researcher cancel TASK
    python -m researcher tasks --session SESSION
    python -m researcher sessions
    python -m researcher close-session SESSION
    python -m researcher keygen ~/.config/pht/identity.txt --register [--save-to-config]

Tables for people by default, --json for scripts. The registry URL and token come from
PHT_REGISTRY_URL and PHT_TOKEN or ~/.config/pht/researcher.toml (see researcher/settings.py); the identity
that opens encrypted results from --identity, PHT_IDENTITY or that file's identity_file, in this order.
Warnings and questions go to standard error, so standard output stays the table or the JSON.
Exit codes: 0 done; 1 an error, or a site did not complete the task; 2 a usage error; 3 a timeout.

What sites and the registry send is not trusted: every string of theirs reaches the terminal escaped
(`one_line`, and a log with only its newlines and tabs kept), and `results --output-dir DIR` writes
only DIR/SITE/ and DIR/SITE.log, SITE being the site's name made a safe folder name.
"""

import dataclasses
import functools
import json
import sys
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.table import Table

from common.printable import escaped, shown
from master import lifecycle
from researcher.client import RegistryError, TaskFailed, TaskTimeout, run_problem
from researcher.images import ImageNotPinned
from researcher.keys import DecryptionFailed, IdentityMissing, generate_identity
from researcher.results import ResultLimits, ResultTooLarge, UnsafeOutput, UnsafeSiteName
from researcher.settings import (IDENTITY_VARIABLE, SettingsError, config_file_path, connect,
                                 identity_file_recordable, record_identity_file)

TIMED_OUT = 3
FILES_SHOWN = 10  # of a result's output files, in the results table
SITES_SHOWN = 10  # of each kind of site not online, in submit's warning (a registry may have thousands)
# In a pipe rich would fold tables to 80 columns; a wider page keeps each row on one line.
PIPE_WIDTH = 200


@click.group(epilog="Exit codes: 0 done; 1 an error, or a site did not complete the task; 2 usage; 3 timeout.")
@click.option("--registry", "registry_url", metavar="URL",
              help="The registry (default: $PHT_REGISTRY_URL or the config file).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file with registry_url, token and identity_file (default: $PHT_CONFIG or "
                   "~/.config/pht/researcher.toml).")
@click.pass_context
def cli(context, registry_url, config_file):
    """Post Personal Health Train tasks to a registry, follow them and fetch their results."""
    context.obj = GroupOptions(registry_url, config_file)


@dataclasses.dataclass(frozen=True)
class GroupOptions:
    """The group's --registry and --config. Subcommands connect lazily, so `--help` of a command works without
    a token."""
    registry_url: str | None
    config_file: Path | None

    def connect(self, identity_file=None):
        return connect(self.registry_url, self.config_file, identity_file)

    def config_path(self):
        return config_file_path(self.config_file)


def command(function):
    """A subcommand with --json, whose anticipated failures end in one line on standard error."""
    @cli.command(name=function.__name__.removesuffix("_command").replace("_", "-"), help=function.__doc__)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
    @click.pass_obj
    @functools.wraps(function)
    def run(options, *args, **kwargs):
        try:
            # --identity (with_identity) is taken here: the identity is loaded as the connection is made.
            return function(options.connect(identity_file=kwargs.pop("identity_file", None)), *args, **kwargs)
        except IdentityMissing as error:
            fail(f"{error.what} is encrypted: give your identity file, the one keygen wrote: --identity FILE, "
                 f"{IDENTITY_VARIABLE}=FILE, or identity_file = \"FILE\" in {options.config_path()}")
        except TaskTimeout as error:
            fail(f"{error}; wait again, or stop it with: python -m researcher cancel {error.task['id']}", TIMED_OUT)
        except ImageNotPinned as error:
            fail(error.explain("use --no-pin"))
        except ResultTooLarge as error:
            fail(error.explain(f"{limit_option(error.limit)} N"))
        except (RegistryError, SettingsError, TaskFailed, DecryptionFailed, UnsafeOutput, UnsafeSiteName,
                OSError) as error:
            fail(str(error))
    return run


def with_result_limits(function):
    """A subcommand that downloads results, with an option for each cap of ResultLimits."""
    @functools.wraps(function)
    def run(registry, *args, **options):
        chosen = {limit.name: options.pop(limit.name) for limit in dataclasses.fields(ResultLimits)}
        registry.limits = dataclasses.replace(registry.limits, **{name: value for name, value in chosen.items()
                                                                  if value is not None})
        return function(registry, *args, **options)
    for limit in reversed(dataclasses.fields(ResultLimits)):
        run = click.option(limit_option(limit.name), limit.name, type=click.IntRange(1), metavar="N",
                           help=f"Cap on the {limit.metadata['what']} (default {limit.default}).")(run)
    return run


def limit_option(limit):
    return "--" + limit.replace("_", "-")


def with_identity(function):
    """A subcommand that may open encrypted results: --identity FILE, which wins over PHT_IDENTITY and the config
    file's identity_file (`command` hands it to the connection)."""
    return click.option("--identity", "identity_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                        metavar="FILE", help=f"Your identity file, which opens encrypted results (default: "
                                             f"${IDENTITY_VARIABLE} or identity_file in the config file).")(function)


def fail(message, exit_code=1):
    click.echo("error: " + escaped(" ".join(message.split())), err=True)
    sys.exit(exit_code)


def warn(message):
    """One line on standard error, where --json's reader does not look; what it quotes is escaped (a newline
    in a site's name included)."""
    click.echo("warning: " + one_line(message), err=True)


def say(line):
    """Print a line that quotes what the registry or a site sent."""
    click.echo(one_line(line))


def one_line(value):
    return escaped(str(value))


@command
def sites(registry, as_json):
    """List the sites: online (polled the registry lately) and whether their SPARQL endpoint answers."""
    found = registry.sites()
    if as_json:
        return print_json(found)
    table = new_table("site", "online", "SPARQL", "last seen (UTC)", "runner")
    for site in found:
        sparql = {True: "ok", False: "not answering", None: "unknown"}[site["sparql_ok"]]
        add_row(table, site["name"], "yes" if site["online"] else "no", sparql,
                short_time(site["last_seen_at"]) or "never", site["runner_version"] or "")
    print_table(table)


@command
@click.argument("image")
@click.option("--input", "input_text", metavar="TEXT", help="The configuration file's text, e.g. '{\"min_count\": 5}'.")
@click.option("--input-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file to send, byte for byte, as the configuration file.")
@click.option("--site", "site_names", multiple=True, metavar="NAME", help="A site to run it (repeat; default all).")
@click.option("--session", "session_id", type=int, help="Add the task to this session.")
@click.option("--name", help="A name for the task.")
@click.option("--timeout", "timeout_seconds", type=click.IntRange(1),
              help="Seconds the algorithm may run at each site.")
@click.option("--encrypt", is_flag=True, help="Sites encrypt results to your registered public keys.")
@click.option("--no-pin", "no_pin", is_flag=True,
              help="Post IMAGE as written, not pinned to the digest its tag names now (for sites that accept tags).")
def submit_command(registry, as_json, image, input_text, input_file, site_names, session_id, name, timeout_seconds,
                   encrypt, no_pin):
    """Post a task: IMAGE for the sites to run, with a configuration file (empty by default).

    IMAGE given by tag is posted pinned to its digest (name:tag@sha256:...), which this machine's Docker engine
    asks the image registry for."""
    if input_text is not None and input_file is not None:
        raise click.UsageError("give --input or --input-file, not both")
    task_input = input_file if input_file is not None else (input_text or "")
    # Asked before posting, so that a registry that cannot list its sites leaves no task behind.
    every_site = None if site_names else registry.sites()
    task = registry.submit(image, task_input, sites=list(site_names) or None, session_id=session_id, name=name,
                           timeout_seconds=timeout_seconds, encrypt=encrypt, pin_digest=not no_pin)
    if as_json:
        print_json(task)
    else:
        sites_named = ", ".join(run["site"] for run in task["runs"])
        say(f"task {task['id']} (session {task['session_id']}) posted for {sites_named}: {task['image']}")
    # After the task is shown: whatever the site list holds, the user has the task's id.
    warning = None if site_names else sites_not_online_warning(task, every_site)
    if warning:
        warn(warning)


def runs_shape_problem(task):
    """Pure: what in a task's answer keeps its runs from being asked for and shown (the library's own check of a run,
    run_problem), or None. A registry may send anything."""
    runs = task.get("runs")
    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        return f"its runs are not a list of records: {shown(runs)}"
    problems = (run_problem(run) for run in runs)
    return next((f"a run has {problem}" for problem in problems if problem), None)


def task_shape_problem(task, runs):
    """Pure: what else in a task's answer (runs: with their history added) the task command cannot show, or None."""
    if not isinstance(task.get("encrypted_to") or [], list):
        return f"encrypted_to is not a list: {shown(task.get('encrypted_to'))}"
    for run in runs:
        for key in ("history", "deliveries"):
            entries = run.get(key, [])
            if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
                return f"run {run['id']}'s {key} is not a list of records: {shown(entries)}"
    return None


def sites_not_online_warning(task, sites):
    """Pure: for a task posted to every site, a warning naming its sites that are not online (sites: as the
    registry lists them), which its runs wait for; None when all are online."""
    # Only well-formed entries count: the task is posted already, and a registry may send anything.
    listed = {site["name"]: site for site in sites if isinstance(site, dict) and isinstance(site.get("name"), str)}
    task_sites = [listed[run["site"]] for run in task.get("runs") or []
                  if isinstance(run, dict) and isinstance(run.get("site"), str) and run["site"] in listed]
    never_seen = [site["name"] for site in task_sites if site.get("last_seen_at") is None]
    offline = [f"{site['name']} (last seen {short_time(site['last_seen_at'])} UTC)" for site in task_sites
               if site.get("last_seen_at") is not None and not site.get("online")]
    if not never_seen and not offline:
        return None
    groups = [f"{label}: {first_few(names, SITES_SHOWN)}. " for label, names in
              (("Never polled the registry", never_seen), ("Offline now", offline)) if names]
    return (f"task {task['id']} went to every site and waits for the ones not online. {''.join(groups)}"
            "To choose the sites, give --site NAME for each (python -m researcher sites lists them).")


@command
@with_identity
@with_result_limits
@click.argument("task_id", type=int)
@click.option("--timeout", "timeout_seconds", type=click.FloatRange(0, min_open=True), default=600,
              show_default=True, help="Give up waiting after this many seconds (exit code 3).")
def wait_command(registry, as_json, task_id, timeout_seconds):
    """Wait until every site's run of a task has ended, showing each site's state."""
    task = registry.wait(task_id, timeout_seconds)
    if as_json:
        print_json(task)
    else:
        print_runs(task)
    if not all(run["status"] == lifecycle.COMPLETED for run in task["runs"]):
        registry.results(task)  # raises TaskFailed, naming each site that did not complete and why


@command
@with_identity
@with_result_limits
@click.argument("task_id", type=int)
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Extract each site's output files to DIR/SITE/ and its log to DIR/SITE.log "
                   "(SITE: the site's name, with any character but a-z, 0-9, '.', '_' and '-' written %XX).")
@click.option("--partial", is_flag=True, help="Show what there is even if some sites did not complete the task.")
@click.option("--logs", is_flag=True, help="Also print each site's log.")
def results_command(registry, as_json, task_id, output_dir, partial, logs):
    """Each site's result: status, exit code, SPARQL queries, image digest, output files and output.txt."""
    results = registry.results(task_id, accept_partial=partial)
    if output_dir is not None:
        for result, (folder, log_file) in zip(results, output_paths(output_dir, results)):
            result.extract_to(folder)
            result.save_log(log_file)
    if as_json:
        return print_json([{"run_id": r.run_id, "site": r.site, "status": r.status, "reason": r.reason,
                            "exit_code": r.exit_code, "image_digest": r.image_digest, "sparql": r.sparql,
                            "files": sorted(r.files), "output": r.output, "log": r.log} for r in results])
    table = new_table("site", "status", "exit code", "queries", "image", "files", "output.txt")
    for result in results:
        output = result.output
        add_row(table, result.site, result.status, "" if result.exit_code is None else result.exit_code,
                describe_sparql(result.sparql), short_digest(result.image_digest), describe_files(result.files),
                "" if output is None else output if isinstance(output, str) else json.dumps(output))
    print_table(table)
    for result in results if logs else []:
        click.echo()
        say(f"--- log of {result.site} ---")
        click.echo(escaped(result.log, keep="\n\t"))
    if output_dir is not None:
        click.echo(f"output files and logs written to {output_dir}/")


def output_paths(output_dir, results):
    """Where each result goes: (output_dir/SITE/, output_dir/SITE.log), SITE its site's safe folder name.

    Raises UnsafeSiteName, before anything is written, for a name that cannot be a folder's, for two sites that
    would share a path (a site called x.log and a site x's log; compared without case, as some file systems
    do), and for a path that leads out of output_dir through a link already there."""
    root = output_dir.resolve()
    owners = {}
    paths = []
    for result in results:
        name = result.folder_name
        pair = (output_dir / name, output_dir / f"{name}.log")
        for path in pair:
            owner = owners.setdefault(path.name.casefold(), result)
            if owner is not result:
                problem = f"the sites '{owner.site}' and '{result.site}' would both write {path.name}"
            elif path.resolve().parent != root:
                problem = f"{path} leads outside it, through a link"
            else:
                continue
            raise UnsafeSiteName(f"cannot write the results to {output_dir}: {problem}; "
                                 "choose another --output-dir, or extract them with the library")
        paths.append(pair)
    return paths


@command
@click.argument("task_id", type=int)
def cancel_command(registry, as_json, task_id):
    """Cancel a task: runs not yet ended stop (running ones at the site's next heartbeat)."""
    task = registry.cancel(task_id)
    if as_json:
        return print_json(task)
    print_runs(task)


@command
@click.option("--session", "session_id", type=int, help="Only this session's tasks.")
@click.option("--status", type=click.Choice([str(status) for status in lifecycle.TaskStatus]))
def tasks_command(registry, as_json, session_id, status):
    """List your tasks, oldest first."""
    found = list(registry.tasks(session_id=session_id, status=status))
    if as_json:
        return print_json(found)
    table = new_table("task", "session", "name", "image", "status", "sites done", "encrypted", "created (UTC)")
    for task in found:
        done = sum(run["status"] == lifecycle.COMPLETED for run in task["runs"])
        add_row(table, task["id"], task["session_id"], task["name"] or "", task["image"], task["status"],
                f"{done}/{len(task['runs'])}", "yes" if task.get("encrypted_to") else "no",
                short_time(task["created_at"]))
    print_table(table)


@command
@click.argument("task_id", type=int)
def task_command(registry, as_json, task_id):
    """One task in full: whether it is encrypted, each site's run with every state it went through (with times),
    and the files each site delivered to a third party (a FileService), as the registry recorded them.

    --json prints the task as the registry answers it, each run with its "history" added."""
    task = registry.task(task_id)
    problem = runs_shape_problem(task)
    runs = [] if problem else [{**run, "history": registry.run_history(run["id"])} for run in task["runs"]]
    problem = problem or task_shape_problem(task, runs)
    if problem:
        raise RegistryError(f"the registry's answer for task {task_id} cannot be shown: {problem}")
    if as_json:
        return print_json({**task, "runs": runs})
    say(f"task {task['id']} (session {task['session_id']}): {task['status']}")
    keys = len(task.get("encrypted_to") or [])
    details = {"name": task["name"] or "", "image": task["image"], "created (UTC)": short_time(task["created_at"]),
               "encrypted": f"yes, to {keys} public key{'s' if keys > 1 else ''}" if keys else "no",
               "timeout": "the site's default" if task["timeout_seconds"] is None else f"{task['timeout_seconds']} s"}
    for label, value in details.items():
        say(f"  {label}: {value}")
    table = new_table("site", "status", "attempts", "exit code", "queries", "image", "reason")
    for run in runs:
        add_row(table, run["site"], run["status"], run["attempts"],
                "" if run["exit_code"] is None else run["exit_code"], describe_sparql(run.get("sparql")),
                short_digest(run["image_digest"]), run["reason"] or "")
    print_table(table)
    click.echo("\nstate changes")
    table = new_table("site", "at (UTC)", "state", "reason")
    for run in runs:
        for event in run["history"]:
            add_row(table, run["site"], short_time(event.get("at")), event.get("status"), event.get("reason") or "")
    print_table(table)
    deliveries = [(run["site"], delivery) for run in runs for delivery in run.get("deliveries", [])]
    if not deliveries:
        return click.echo("\nno files delivered to a third party")
    click.echo("\nfiles delivered to a third party (receipts: the sha256 is of the file as sent, encrypted)")
    table = new_table("site", "recipient", "file", "size", "sha256", "at (UTC)")
    for site, delivery in deliveries:
        size = delivery.get("size")
        add_row(table, site, delivery.get("recipient"), delivery.get("name"),
                human_bytes(size) if type(size) is int else size, short_digest(delivery.get("sha256")),
                short_time(delivery.get("at")))
    print_table(table)


@command
def sessions(registry, as_json):
    """List your sessions, oldest first: how many tasks each has, and whether you closed it."""
    found = list(registry.sessions())
    if as_json:
        return print_json(found)
    table = new_table("session", "tasks", "created (UTC)", "closed (UTC)")
    for session in found:
        add_row(table, session["id"], session["task_count"], short_time(session["created_at"]),
                short_time(session["closed_at"]) or "open")
    print_table(table)


@command
@click.argument("session_id", type=int)
def close_session_command(registry, as_json, session_id):
    """Close a session whose tasks have ended: it takes no more tasks, and the sites remove its /temp/."""
    session = registry.close_session(session_id)
    if as_json:
        return print_json(session)
    say(f"session {session['id']} closed; each site removes its /temp/ of it when it next asks the registry")


@cli.command()
@click.argument("identity_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--register", is_flag=True, help="Also register the public key at the registry.")
@click.option("--save-to-config/--no-save-to-config", default=None,
              help="Record IDENTITY_FILE as identity_file in the config file, so that results opens encrypted results "
                   "without --identity (default: ask, when run in a terminal; else do not).")
@click.pass_obj
def keygen(options, identity_file, register, save_to_config):
    """Make an age key pair: the private key goes to IDENTITY_FILE (yours alone), the public key is printed."""
    identity_file = identity_file.expanduser().absolute()
    config_file = options.config_path()
    asking = can_ask()
    record = asking if save_to_config is None else save_to_config
    try:
        # Checked before the key is made, so that a config file that cannot take the setting leaves nothing behind.
        recorded = identity_file_recordable(config_file, identity_file) if record else None
        another_recorded = recorded is not None and Path(recorded).expanduser().resolve() != identity_file.resolve()
        if another_recorded and not asking:
            # Refused, not replaced: a script that goes on would find its results opened with another identity.
            fail(f"{config_file} names another identity file already (identity_file = {recorded}); nothing was "
                 f"made. Remove that line to record {identity_file} there, or run keygen with --no-save-to-config "
                 f"and give {identity_file} to results with --identity or {IDENTITY_VARIABLE}")
        public_key = generate_identity(identity_file)
        if register:
            options.connect(identity_file=identity_file).register_public_key(public_key)
        click.echo(public_key)
        if register:
            click.echo(f"registered; tasks posted with --encrypt are now readable with {identity_file} only", err=True)
        if recorded is not None and not another_recorded:
            return click.echo(f"{config_file} names {identity_file} already", err=True)
        if record and asking and (save_to_config is None or another_recorded):
            question = (f"{config_file} names another identity file, {recorded}: replace it with {identity_file}?"
                        if another_recorded else
                        f"record it in {config_file}, so that results opens encrypted results without --identity?")
            record = click.confirm(question, default=not another_recorded, err=True)
        if not record:
            return click.echo(f"not recorded in {config_file}: give results --identity {identity_file}, set "
                              f"{IDENTITY_VARIABLE}={identity_file}, or put identity_file = \"{identity_file}\" "
                              "in that file", err=True)
        record_identity_file(config_file, identity_file)
        click.echo(f"recorded in {config_file}: identity_file = \"{identity_file}\"", err=True)
    except (FileExistsError, RegistryError, SettingsError) as error:
        fail(str(error))


def can_ask():
    """Whether a person can see a question and answer it: standard input and standard error are a terminal
    (standard output may be a pipe taking the public key)."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def print_runs(task):
    table = new_table("site", "status", "exit code", "queries", "reason")
    for run in task["runs"]:
        add_row(table, run["site"], run["status"], "" if run["exit_code"] is None else run["exit_code"],
                describe_sparql(run.get("sparql")), run["reason"] or "")
    say(f"task {task['id']} (session {task['session_id']}): {task['status']}")
    print_table(table)


def new_table(*columns):
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, highlight=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def add_row(table, *cells):
    """A row of cells, each on one line whatever the registry or a site put in it."""
    table.add_row(*(one_line(cell) for cell in cells))


def print_table(table):
    # markup off: a site's name or a failure reason may contain [brackets].
    stdout = Console(highlight=False, markup=False)
    if not stdout.is_terminal:
        stdout = Console(highlight=False, markup=False, width=PIPE_WIDTH)
    stdout.print(table)


def print_json(value):
    # ensure_ascii (json's default) writes every control and non-ASCII character as \uXXXX: no string in
    # value can reach a terminal as a control sequence.
    click.echo(json.dumps(value, indent=2, ensure_ascii=True))


def describe_files(files):
    """A result's files in one cell: the first few names, in the archive's order, then how many more (a site may
    send 100,000)."""
    return first_few(files, FILES_SHOWN)


def first_few(names, shown):
    """The first `shown` of names (any iterable, read once), then how many more: "a, b, c and 12 more"."""
    first, more = [], 0
    for name in names:
        if len(first) < shown:
            first.append(str(name))
        else:
            more += 1
    return ", ".join(first) + (f" and {more} more" if more else "")


def short_digest(digest):
    return digest[:19] + "…" if digest else ""


def short_time(timestamp):
    """A registry's ISO 8601 time to the second, "2026-12-04T10:00:00"; "" for none."""
    return str(timestamp)[:19] if timestamp else ""


def describe_sparql(summary):
    """A run's SPARQL summary in one cell: "12 (1 refused), 3.4 MB"; "-" when the site reported none."""
    if summary is None:
        return "-"
    refused = f" ({summary['refused']} refused)" if summary["refused"] else ""
    return f"{summary['queries']}{refused}, {human_bytes(summary['bytes'])}"


def human_bytes(count):
    """A size in decimal (SI) units, one decimal place: 512 B, 3.4 MB."""
    if count < 1000:
        return f"{count} B"
    for unit in ("kB", "MB", "GB", "TB", "PB", "EB"):
        count /= 1000
        # 999.96 would print as 1000.0: say 1.0 of the next unit instead.
        if count < 999.95 or unit == "EB":
            return f"{count:.1f} {unit}"


if __name__ == "__main__":
    cli()
