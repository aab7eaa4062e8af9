"""The site runner of the Personal Health Train: run at a hospital, next to its data.

    python client/runScript.py --config config.json [--once]
    python client/runScript.py queries RUN_ID [--config config.json] [--json]
    python client/runScript.py approvals|outputs|audit ...   the IT officer's commands (officer_commands.py)

It polls the registry (outbound HTTP(S) only), runs the tasks whose image the
site's whitelist allows, in contained Docker containers, and sends back their
results. See docs/site-config.md for the config file. `queries` lists what a run's
algorithm asked the site's SPARQL gateway (docs/site-config.md); approvals, outputs and audit
are the IT officer's day (docs/site-operations.md).

The whitelist, require_digest, approval_policy and airlock are taken up again, with the same checks
as at start, when the config file changes or on SIGHUP; a config that fails them is not taken up.

Stopping: the first SIGTERM or Ctrl-C stops claiming runs and lets the current ones
finish; a second one exits at once, leaving the current runs' containers and files
for the next start to carry on with.
"""

import argparse
import json
import logging
import signal
import sys
import tempfile

import docker.errors

from client import containers, disk_limits
from client.audit_log import AuditLogBroken
from client.officer_commands import CommandFailed, Officer
from client.registry_client import RegistryClient
from client.runner import SiteRunner, WrongIdentity, startup_summary, startup_warnings, uses_gateway
from client.sparql_gateway import query_log_path, read_query_log
from common.log_lines import log_to_stderr
from common.printable import printable
from master import lifecycle
from client.site_config import ConfigError, ConfigSource, load_site_config

log = logging.getLogger("pht.runner")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Personal Health Train site runner")
    parser.add_argument("--config", default="config.json", help="site config file (default: config.json)")
    parser.add_argument("--once", action="store_true",
                        help="poll once: claim and finish at most one run (and any left from before), then exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    queries = commands.add_parser("queries", help="list the SPARQL queries a run's algorithm made at this site")
    queries.add_argument("run_id", type=int, metavar="RUN_ID")
    queries.add_argument("--config", default=argparse.SUPPRESS, help="site config file (default: config.json)")
    queries.add_argument("--json", action="store_true", help="the recorded JSON lines, as they are")
    add_officer_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "queries":
        sys.exit(list_queries(args.config, args.run_id, args.json))
    if args.command in ("approvals", "outputs", "audit"):
        sys.exit(officer_command(args))
    log_to_stderr("%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    # urllib3 logs some failures itself, at WARNING: as its exceptions' chain ("Retrying (Retry(total=...)) after
    # connection broken by ...") or with a traceback (a malformed header in an answer). The runner says what went
    # wrong with the registry itself, in one line (registry_client.connection_problem).
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    config, engine, problems = None, None, []
    try:
        config = load_site_config(args.config)
    except ConfigError as error:
        problems += error.problems
    try:
        engine = containers.connect_engine()
    except docker.errors.DockerException as error:
        problems.append(f"{args.config}: no Docker engine answers ({error}); start Docker, "
                        "and make sure this user may use it")
    if config and engine:
        problems += [f"{args.config}: {problem}" for problem in startup_problems(config, engine)]
    if problems:
        sys.exit("\n".join(problems))

    registry = RegistryClient(config.registry_url, config.site_token,
                              connections=2 * config.max_concurrent_runs + 1, ca_bundle=config.ca_bundle)
    runner = SiteRunner(config, engine, registry)

    def stop(signum, _frame):
        if runner.stopping.is_set():
            log.warning("signal %s again: exiting now; the next start carries on with the unfinished runs", signum)
            raise SystemExit(1)
        log.info("signal %s: claiming no more runs, finishing the current ones (signal again to exit at once)",
                 signum)
        runner.stopping.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    # Only a flag here (logging in a signal handler is unsafe); the main loop reads the file.
    signal.signal(signal.SIGHUP, lambda _signum, _frame: runner.config_changed.set())
    runner.config_source = ConfigSource(args.config)
    for line in startup_summary(config):
        log.info("%s", line)
    for warning in startup_warnings(config):
        log.warning("%s", warning)
    try:
        runner.run_until_stopped(once=args.once)
    except (WrongIdentity, disk_limits.DiskLimitsUnavailable) as error:
        sys.exit(f"{args.config}: {error}")
    except AuditLogBroken as error:
        sys.exit(f"{args.config}: the runner stopped: {error}")
    if runner.audit_broken:
        sys.exit(f"{args.config}: the runner stopped: {runner.audit_broken}")
    if runner.wrong_identity:
        sys.exit(f"{args.config}: {runner.wrong_identity}")
    log.info("runner stopped")


def add_officer_commands(commands):
    config = {"default": argparse.SUPPRESS, "help": "site config file (default: config.json)"}
    by = {"help": "who decides, for the audit log (default: the login that runs the command)"}
    approvals = commands.add_parser("approvals", help="runs waiting for the IT officer's approval").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    listed = approvals.add_parser("list", help="the runs that wait")
    listed.add_argument("--config", **config)
    show = approvals.add_parser("show", help="a waiting run's image, input and researcher")
    show.add_argument("run_id", type=int, metavar="RUN")
    show.add_argument("--config", **config)
    approve = approvals.add_parser("approve", help="approve a waiting run's image digest (or its task alone)")
    approve.add_argument("run_id", type=int, metavar="RUN", nargs="?")
    approve.add_argument("--digest", help="approve this image digest (sha256:...) before any run of it waits")
    approve.add_argument("--researcher", help="only for this researcher's runs")
    approve.add_argument("--days", type=float, help="the approval expires after this many days")
    approve.add_argument("--only-this-task", action="store_true", help="approve this run's task, not its image")
    approve.add_argument("--note", help="a note kept with the approval")
    approve.add_argument("--by", **by)
    approve.add_argument("--config", **config)
    deny = approvals.add_parser("deny", help="refuse a waiting run; the researcher sees the reason")
    deny.add_argument("run_id", type=int, metavar="RUN")
    deny.add_argument("--reason", required=True)
    deny.add_argument("--by", **by)
    deny.add_argument("--config", **config)
    outputs = commands.add_parser("outputs", help="results held for review (airlock.review)").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    listed = outputs.add_parser("list", help="the runs whose results are held")
    listed.add_argument("--config", **config)
    for action, what in (("show", "the files, sizes and text of held results"), ("release", "let them leave"),
                         ("reject", "keep them at the site; the researcher sees the reason")):
        sub = outputs.add_parser(action, help=what)
        sub.add_argument("run_id", type=int, metavar="RUN")
        if action == "reject":
            sub.add_argument("--reason", required=True)
        if action != "show":
            sub.add_argument("--by", **by)
        sub.add_argument("--config", **config)
    audit = commands.add_parser("audit", help="the site's audit log").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    audit.add_parser("verify", help="check the log's hash chain; names the first broken entry").add_argument(
        "--config", **config)
    show = audit.add_parser("show", help="the log, or one run's story")
    show.add_argument("--run", type=int, dest="run_id")
    show.add_argument("--config", **config)


def officer_command(args):
    """Run one of the IT officer's commands; returns the exit code (or the one line saying what failed)."""
    try:
        config = load_site_config(args.config)
    except ConfigError as error:
        return str(error)
    officer = Officer(config, by=getattr(args, "by", None))
    action = (args.command, args.action)
    try:
        if action == ("approvals", "list"):
            officer.list_waiting(lifecycle.AWAITING_APPROVAL)
        elif action == ("approvals", "show"):
            officer.show_approval(args.run_id)
        elif action == ("approvals", "approve"):
            officer.approve(args.run_id, args.digest, args.researcher, args.days, args.only_this_task, args.note)
        elif action == ("approvals", "deny"):
            officer.deny(args.run_id, args.reason)
        elif action == ("outputs", "list"):
            officer.list_waiting(lifecycle.HELD_FOR_REVIEW)
        elif action == ("outputs", "show"):
            officer.show_output(args.run_id)
        elif action in (("outputs", "release"), ("outputs", "reject")):
            officer.review(args.run_id, args.action == "release", getattr(args, "reason", None))
        elif action == ("audit", "verify"):
            officer.verify_audit()
        else:
            officer.show_audit(args.run_id)
    except CommandFailed as error:
        return str(error)
    return 0


def list_queries(config_path, run_id, as_json):
    """Print a run's recorded SPARQL queries; returns the exit code."""
    try:
        config = load_site_config(config_path)
    except ConfigError as error:
        return str(error)
    path = query_log_path(config.work_dir, run_id)
    listed = 0
    for entry in read_query_log(path):
        listed += 1
        if as_json:
            print(json.dumps(entry))
            continue
        rows = "" if entry.get("rows") is None else f" {entry['rows']} rows"
        what = " ".join((entry.get("query") or f"sha256:{entry.get('query_sha256')}").split())
        why = f" ({entry['reason']})" if entry.get("reason") else ""
        print(printable(f"{entry.get('at')} {entry.get('status')} {entry.get('http_status')} "
                        f"{entry.get('form') or '-'}{rows} {entry.get('bytes')} bytes {entry.get('duration_ms')} ms: "
                        f"{what[:200]}{why}"))
    if not listed:
        print(f"run {run_id}: no SPARQL queries recorded at this site ({path} is missing or empty)", file=sys.stderr)
    return 0


def startup_problems(config, engine):
    """What in the config does not fit this machine: its Docker engine and its folders."""
    problems = [containers.network_problem(engine, config.container.network),
                containers.cpus_problem(engine, config.container.cpus)]
    if uses_gateway(config):
        base = config.sparql_gateway.relay_base_image
        try:
            engine.images.get(base)
        except docker.errors.ImageNotFound:
            problems.append(f"sparql_gateway.relay_base_image {base} is not an image in this Docker engine; the "
                            "SPARQL relay is built on it: load or pull an image with python3 (scripts/images.py "
                            "builds pht-base:bookworm), or name one you have")
    try:
        config.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=config.work_dir):
            pass
    except OSError as error:
        problems.append(f"work_dir {config.work_dir} is not a folder this runner can write to ({error}); "
                        "create it, or give the runner's user access")
    if config.image_import_folder and not config.image_import_folder.is_dir():
        problems.append(f"image_import_folder {config.image_import_folder} is not a folder; "
                        "create it, or leave the field out")
    return [problem for problem in problems if problem]


if __name__ == "__main__":
    main()
