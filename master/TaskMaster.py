"""The central registry of the Personal Health Train.

    python master/TaskMaster.py                      serve on 0.0.0.0:5000 (SQLite in ./registry-data)
    python master/TaskMaster.py create-site NAME     register a site and print its token once
    python master/TaskMaster.py create-researcher NAME
    python master/TaskMaster.py create-operator NAME   a token for the dashboard's operator pages and /api/operator
    python master/TaskMaster.py list-sites
    python master/TaskMaster.py list-researchers
    python master/TaskMaster.py list-operators
    python master/TaskMaster.py revoke NAME [--site | --researcher | --operator]
    python master/TaskMaster.py revoke --token-stdin < token.txt
    python master/TaskMaster.py rotate-token NAME [--site | --researcher | --operator]

Every command takes --data-dir and --database-url, before or after the command's name.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # gevent's server parks each waiting long-poll as a greenlet; blocking I/O must be
    # made cooperative before anything else imports it. Harmless for the admin commands.
    from gevent import monkey
    monkey.patch_all()

import functools  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import click  # noqa: E402

from common import names  # noqa: E402
from common.log_lines import log_to_stderr  # noqa: E402
from common.printable import escaped  # noqa: E402
from master import auth, store  # noqa: E402
from master.app import (Settings, create_app, expire_leases_periodically, hear_other_replicas, open_data,  # noqa: E402
                        write_sightings_periodically)
from master.server import limit_options, tls_options  # noqa: E402


DEFAULT_DATA_DIR = Path("registry-data")
data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help=f"Folder for the SQLite database and result files. Default: ./{DEFAULT_DATA_DIR}.")
database_url_option = click.option(
    "--database-url", default=None, envvar="PHT_DATABASE_URL",
    help="SQLAlchemy URL, e.g. postgresql+psycopg://user@127.0.0.1/pht. Default: SQLite in --data-dir.")


@click.group(invoke_without_command=True)
@data_dir_option
@database_url_option
@click.pass_context
def cli(context, data_dir, database_url):
    """The Personal Health Train's central registry: `serve` it (the default), and register its sites and
    researchers."""
    if context.invoked_subcommand is None:
        context.invoke(serve)


def with_settings(command):
    """Give command the registry's Settings, from --data-dir and --database-url given before its name or
    after it (after wins): operators type them either way, and a forgotten one must not go unnoticed."""
    @data_dir_option
    @database_url_option
    @click.pass_context
    @functools.wraps(command)
    def with_location(context, data_dir, database_url, **options):
        before = context.find_root().params
        settings = Settings(data_dir=data_dir or before["data_dir"] or DEFAULT_DATA_DIR,
                            database_url=database_url or before["database_url"] or "")
        return command(settings, **options)
    return with_location


@cli.command()
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--lease-seconds", default=60, show_default=True, type=click.IntRange(2, 3600),
              help="How long a claimed run stays a site's without a heartbeat.")
@click.option("--max-input-bytes", default=4 * 1024 ** 2, show_default=True, type=click.IntRange(1),
              help="Largest task configuration file accepted.")
@click.option("--max-result-bytes", default=2 * 1024 ** 3, show_default=True, type=click.IntRange(1),
              help="Largest output archive or log a site may upload.")
@click.option("--result-store", default="", envvar="PHT_RESULT_STORE", metavar="s3://BUCKET[/PREFIX]",
              help="Where results are kept: an S3-compatible bucket, shared by every replica of the registry. "
                   "Default: the folder blobs/ in --data-dir. Credentials: AWS_ACCESS_KEY_ID and "
                   "AWS_SECRET_ACCESS_KEY (or boto3's other usual places).")
@click.option("--s3-endpoint-url", default="", envvar="PHT_S3_ENDPOINT_URL",
              help="The object store's URL, for one other than AWS (MinIO, Ceph, SeaweedFS).")
@click.option("--database-pool-size", default=20, show_default=True, type=click.IntRange(1),
              help="Database connections this process keeps; requests share them for the moment of their queries. "
                   "A request that finds none free for 30 s gets 503 with Retry-After. On PostgreSQL, keep "
                   "replicas x this under the server's max_connections.")
@limit_options
@tls_options
@with_settings
def serve(settings, host, port, lease_seconds, max_input_bytes, max_result_bytes, result_store, s3_endpoint_url,
          database_pool_size, limits, tls):
    """Serve the registry with gevent's WSGI server (many waiting long-polls, one process)."""
    import threading

    from master.blobs import StoreUnreachable
    from master.server import serve_forever

    log_to_stderr("%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(**{**settings.__dict__, "lease_seconds": lease_seconds,
                           "max_input_bytes": max_input_bytes, "max_result_bytes": max_result_bytes,
                           "result_store": result_store, "s3_endpoint_url": s3_endpoint_url,
                           "database_pool_size": database_pool_size})
    if _no_registry_yet(settings):
        logging.getLogger("pht.registry").warning("%s", new_registry_note(settings))
    try:
        app = create_app(settings)
    except StoreUnreachable as error:
        raise click.ClickException(str(error)) from None
    if app.extensions["pht"].engine.dialect.name == "postgresql" and not result_store:
        logging.getLogger("pht.registry").warning(
            "results are kept in %s, this process's own: replicas on one database need one --result-store",
            settings.data_dir / "blobs")
    threading.Thread(target=expire_leases_periodically, args=(app, threading.Event(), max(1, lease_seconds / 4)),
                     name="lease-sweeper", daemon=True).start()
    threading.Thread(target=write_sightings_periodically, args=(app, threading.Event()), name="sightings",
                     daemon=True).start()
    threading.Thread(target=hear_other_replicas, args=(app, threading.Event()), name="replica-news",
                     daemon=True).start()
    logging.getLogger("pht.registry").info("registry listening on %s://%s:%d (data in %s, results in %s)",
                                           "https" if tls else "http", host, port, settings.data_dir,
                                           app.extensions["pht"].blobs.describe())
    serve_forever(app, host, port, limits, tls)


def _engine(settings, making=False):
    """The registry's database. A command that only reads or changes what is there refuses a data folder
    without one, rather than make an empty registry where the operator forgot --data-dir; one that adds
    (create-site, create-researcher) makes it, and says where."""
    if _no_registry_yet(settings):
        if not making:
            raise click.ClickException(
                f"no registry in {settings.data_dir.resolve()} (it has no {settings.sqlite_path.name}); give the "
                "registry's --data-dir, or --database-url, before or after the command's name")
        click.echo(f"warning: {new_registry_note(settings)}", err=True)
    return open_data(settings)


def _no_registry_yet(settings):
    """An embedded registry whose database is not there yet (on PostgreSQL, the tables are made as needed)."""
    return not settings.database_url and not settings.sqlite_path.exists()


def new_registry_note(settings):
    return (f"making a new, empty registry in {settings.data_dir.resolve()}; if you meant an existing one, "
            "give its --data-dir")


def _create_principal(settings, role, name):
    token = auth.new_token()
    try:
        store.create_principal(_engine(settings, making=True), role, name, auth.hash_token(token))
    except store.Invalid as error:
        raise click.ClickException(str(error)) from None
    except store.Conflict as error:
        raise click.ClickException(f"{error}; choose another name, or give it a new token with: "
                                   f"rotate-token --{role} {name}") from None
    click.echo(token)


@cli.command("create-site")
@click.argument("name")
@with_settings
def create_site(settings, name):
    """Register a site; prints its token (shown only this once)."""
    _create_principal(settings, store.SITE, name)


@cli.command("create-researcher")
@click.argument("name")
@with_settings
def create_researcher(settings, name):
    """Register a researcher; prints their token (shown only this once)."""
    _create_principal(settings, store.RESEARCHER, name)


def _when(timestamp):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


@cli.command("create-operator")
@click.argument("name")
@with_settings
def create_operator(settings, name):
    """Register an operator, who reads every site and task on the dashboard (/ui/) and at /api/operator;
    prints their token (shown only this once)."""
    _create_principal(settings, store.OPERATOR, name)


@cli.command("list-sites")
@with_settings
def list_sites(settings):
    """The sites, when each was last seen and whether it is revoked."""
    for site in store.list_sites(_engine(settings))[0]:
        seen = _when(site["last_seen_at"]) if site["last_seen_at"] else "never"
        state = "revoked" if site["revoked_at"] else "active"
        # Written by the site itself (runner_version) or before names were checked: shown escaped.
        click.echo(escaped(f"{site['name']}\t{state}\tlast seen {seen}\tsparql_ok={site['sparql_ok']}\t"
                           f"runner {site['runner_version'] or '-'}", keep="\t"))


@cli.command("list-researchers")
@with_settings
def list_researchers(settings):
    """The researchers, when each was registered and whether they are revoked."""
    _list_people(store.list_researchers(_engine(settings)))


@cli.command("list-operators")
@with_settings
def list_operators(settings):
    """The operators, when each was registered and whether they are revoked."""
    _list_people(store.list_operators(_engine(settings)))


def _list_people(people):
    for person in people:
        state = f"revoked {_when(person['revoked_at'])}" if person["revoked_at"] else "active"
        click.echo(escaped(f"{person['name']}\t{state}\tsince {_when(person['created_at'])}", keep="\t"))


def _role_of(settings, name, as_site, as_researcher, as_operator=False):
    """The role a command on name means: the one asked for, or the only one that has the name."""
    if as_site + as_researcher + as_operator > 1:
        raise click.UsageError("give one of --site, --researcher and --operator")
    roles = store.roles_named(_engine(settings), name)
    if not roles and not names.PRINCIPAL_NAME.fullmatch(name):
        # Not echoed: it may be a token given by mistake, which must not reach a terminal's scrollback too.
        raise click.UsageError(f"NAME must be a site's or researcher's name ({names.PRINCIPAL_NAME_RULE}); "
                               "to revoke by token, give it on standard input to revoke --token-stdin")
    asked = store.SITE if as_site else store.RESEARCHER if as_researcher else store.OPERATOR if as_operator else None
    if asked in roles or (asked is None and len(roles) == 1):
        return asked or roles[0]
    if len(roles) > 1:
        raise click.UsageError(f"both a {' and a '.join(roles)} are called {name!r}: "
                               f"say which with {' or '.join('--' + role for role in roles)}")
    if asked == store.OPERATOR:
        raise click.ClickException(f"no operator is called {name!r}; see list-operators")
    raise click.ClickException(f"no {asked or 'site or researcher'} is called {name!r}"
                               f"{'' if asked else ' (nor an operator)'}; see list-sites, list-researchers "
                               "and list-operators")


def _token_from_stdin():
    token = sys.stdin.readline().strip()
    if not token:
        raise click.UsageError("--token-stdin reads the token from standard input, and it was empty")
    return token


@cli.command()
@click.argument("name", required=False)
@click.option("--site", "as_site", is_flag=True, help="NAME is a site's.")
@click.option("--researcher", "as_researcher", is_flag=True, help="NAME is a researcher's.")
@click.option("--operator", "as_operator", is_flag=True, help="NAME is an operator's.")
@click.option("--token-stdin", is_flag=True,
              help="Revoke whoever holds the token read from standard input (never give a token as an argument: "
                   "it would stay in the shell's history and show in ps).")
@with_settings
def revoke(settings, name, as_site, as_researcher, as_operator, token_stdin):
    """Revoke a site, researcher or operator, by NAME or by token, and end what it leaves unfinished.

    A revoked site's unfinished runs fail; a revoked researcher's unfinished tasks are cancelled, so no
    site runs them; a revoked operator's dashboard session ends at once. rotate-token gives any of them a new
    token later."""
    if token_stdin == (name is not None):
        raise click.UsageError("give a NAME, or --token-stdin and the token on standard input")
    engine = _engine(settings)
    if token_stdin:
        holder = store.find_principal(engine, auth.hash_token(_token_from_stdin()))
        if holder is None:
            raise click.ClickException("no active site, researcher or operator holds that token")
        role, _, name = holder
    else:
        role = _role_of(settings, name, as_site, as_researcher, as_operator)
    try:
        ended = store.revoke_principal(engine, role, name)
    except store.NotFound as error:
        raise click.ClickException(f"{error} (already revoked?)") from None
    if role == store.OPERATOR:
        click.echo(f"revoked operator {name}")
        return
    what = "failed" if role == store.SITE else "cancelled"
    click.echo(f"revoked {role} {name}; {len(ended)} unfinished run(s) {what}")


@cli.command("rotate-token")
@click.argument("name")
@click.option("--site", "as_site", is_flag=True, help="NAME is a site's.")
@click.option("--researcher", "as_researcher", is_flag=True, help="NAME is a researcher's.")
@click.option("--operator", "as_operator", is_flag=True, help="NAME is an operator's.")
@with_settings
def rotate_token(settings, name, as_site, as_researcher, as_operator):
    """Give a site, researcher or operator a new token (printed once); the old one stops working at once.

    Also gives a revoked one a token again."""
    role = _role_of(settings, name, as_site, as_researcher, as_operator)
    token = auth.new_token()
    try:
        store.replace_token(_engine(settings), role, name, auth.hash_token(token))
    except store.NotFound as error:
        raise click.ClickException(str(error)) from None
    click.echo(token)


if __name__ == "__main__":
    cli()
