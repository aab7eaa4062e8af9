"""The central registry of the Personal Health Train.

    python master/TaskMaster.py                      serve on 0.0.0.0:5000 (SQLite in ./registry-data)
    python master/TaskMaster.py create-site NAME     register a site and print its token once
    python master/TaskMaster.py create-researcher NAME
    python master/TaskMaster.py list-sites
    python master/TaskMaster.py revoke TOKEN-OR-NAME

Every command takes --data-dir and --database-url before the command name.
"""

import sys
from pathlib import Path

# Run as a script (as in the original PyTaskManager), so make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    # gevent's server parks each waiting long-poll as a greenlet; blocking I/O must be
    # made cooperative before anything else imports it. Harmless for the admin commands.
    from gevent import monkey
    monkey.patch_all()

import logging  # noqa: E402
import time  # noqa: E402

import click  # noqa: E402

from master import auth, store  # noqa: E402
from master.app import Settings, create_app, expire_leases_periodically  # noqa: E402


@click.group(invoke_without_command=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("registry-data"),
              show_default=True, help="Folder for the SQLite database and result files.")
@click.option("--database-url", default="", envvar="PHT_DATABASE_URL",
              help="SQLAlchemy URL, e.g. postgresql+psycopg://user@127.0.0.1/pht. Default: SQLite in --data-dir.")
@click.pass_context
def cli(context, data_dir, database_url):
    context.obj = Settings(data_dir=data_dir, database_url=database_url)
    if context.invoked_subcommand is None:
        context.invoke(serve)


@cli.command()
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--lease-seconds", default=60, show_default=True, type=click.IntRange(2, 3600),
              help="How long a claimed run stays a site's without a heartbeat.")
@click.option("--max-input-bytes", default=4 * 1024 ** 2, show_default=True, type=click.IntRange(1),
              help="Largest task configuration file accepted.")
@click.option("--max-result-bytes", default=2 * 1024 ** 3, show_default=True, type=click.IntRange(1),
              help="Largest output archive or log a site may upload.")
@click.pass_obj
def serve(settings, host, port, lease_seconds, max_input_bytes, max_result_bytes):
    """Serve the registry with gevent's WSGI server (many waiting long-polls, one process)."""
    import threading

    from master.server import serve_forever

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(**{**settings.__dict__, "lease_seconds": lease_seconds,
                           "max_input_bytes": max_input_bytes, "max_result_bytes": max_result_bytes})
    _allow_many_open_sockets()
    app = create_app(settings)
    threading.Thread(target=expire_leases_periodically, args=(app, threading.Event(), max(1, lease_seconds / 4)),
                     name="lease-sweeper", daemon=True).start()
    logging.getLogger("pht.registry").info("registry listening on http://%s:%d (data in %s)",
                                           host, port, settings.data_dir)
    serve_forever(app, host, port)


def _allow_many_open_sockets():
    """Every waiting site holds a socket; a common default of 1024 open files would cap the sites."""
    try:
        import resource
    except ImportError:  # Windows: no such per-process limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _engine(settings):
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    return store.open_database(settings.resolved_database_url())


def _create_principal(settings, table, name):
    token = auth.new_token()
    try:
        store.create_principal(_engine(settings), table, name, auth.hash_token(token))
    except store.Conflict as error:
        raise click.ClickException(f"{error}; choose another name or revoke the old one") from None
    click.echo(token)


@cli.command("create-site")
@click.argument("name")
@click.pass_obj
def create_site(settings, name):
    """Register a site; prints its token (shown only this once)."""
    _create_principal(settings, store.sites, name)


@cli.command("create-researcher")
@click.argument("name")
@click.pass_obj
def create_researcher(settings, name):
    """Register a researcher; prints their token (shown only this once)."""
    _create_principal(settings, store.researchers, name)


@cli.command("list-sites")
@click.pass_obj
def list_sites(settings):
    """The sites, when each was last seen and whether it is revoked."""
    for site in store.list_sites(_engine(settings))[0]:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(site["last_seen_at"])) if site["last_seen_at"] else "never"
        state = "revoked" if site["revoked_at"] else "active"
        click.echo(f"{site['name']}\t{state}\tlast seen {seen}\tsparql_ok={site['sparql_ok']}")


@cli.command()
@click.argument("token_or_name")
@click.pass_obj
def revoke(settings, token_or_name):
    """Revoke a site's or researcher's token, given the token itself or the name."""
    revoked = store.revoke_principal(_engine(settings), auth.hash_token(token_or_name)) or \
        store.revoke_principal(_engine(settings), token_or_name)
    if not revoked:
        raise click.ClickException(f"no active site or researcher matches {token_or_name!r}")
    for role, name in revoked:
        click.echo(f"revoked {role} {name}")


if __name__ == "__main__":
    cli()
