"""The FileService of the Personal Health Train: run by a trusted third party (TTP) to receive
files that sites send it directly, encrypted to its own key, without passing the registry.

    python fileservice/FileService.py                       serve on 0.0.0.0:5001 (data in ./fileservice-data)
    python fileservice/FileService.py public-key            print the key senders encrypt to (pin it in their config)
    python fileservice/FileService.py add-sender NAME       print a site's sender token, once
    python fileservice/FileService.py add-operator NAME     print a token for listing and downloading, once
    python fileservice/FileService.py revoke NAME
    python fileservice/FileService.py list-files              every received file: sender, name, size in bytes
    python fileservice/FileService.py export SENDER NAME OUT   decrypt a received file
    python fileservice/FileService.py delete SENDER NAME       delete a received file

A file's name is TASK/NAME: the registry's task that sent it, and the name its algorithm wrote, with .age
(sites encrypt before sending). export and delete take SENDER and NAME exactly as list-files shows them.
A file from a site runner that names no task (as runners did before) is NAME alone.

Every command takes --data-dir before the command name.
"""

if __name__ == "__main__":
    # gevent's server streams many uploads at once in one process; patch before anything imports I/O.
    from gevent import monkey
    monkey.patch_all()

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from common.log_lines import log_to_stderr  # noqa: E402
from fileservice.inbox import OPERATOR, SENDER, Inbox, Refused  # noqa: E402
from master.server import limit_options, tls_options  # noqa: E402


@click.group(invoke_without_command=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("fileservice-data"),
              show_default=True, help="Folder for the key pair, tokens and received files.")
@click.pass_context
def cli(context, data_dir):
    context.obj = data_dir
    if context.invoked_subcommand is None:
        context.invoke(serve)


@cli.command()
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=5001, show_default=True, type=int)
@click.option("--max-file-bytes", default=2 * 1024 ** 3, show_default=True, type=click.IntRange(1),
              help="Largest file a sender may send.")
@limit_options
@tls_options
@click.pass_obj
def serve(data_dir, host, port, max_file_bytes, limits, tls):
    """Serve the FileService."""
    from fileservice.app import create_app
    from master.server import serve_forever

    log_to_stderr("%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(data_dir, max_file_bytes)
    logging.getLogger("pht.fileservice").info("FileService on %s://%s:%d, public key %s", "https" if tls else "http",
                                              host, port, app.extensions["inbox"].public_key)
    serve_forever(app, host, port, limits, tls)


def _inbox(data_dir):
    return Inbox(data_dir)


@cli.command("public-key")
@click.pass_obj
def public_key(data_dir):
    """The age public key that senders encrypt to."""
    click.echo(_inbox(data_dir).public_key)


def _add(data_dir, name, role):
    try:
        click.echo(_inbox(data_dir).add_caller(name, role))
    except Refused as error:
        raise click.ClickException(str(error)) from None


@cli.command("add-sender")
@click.argument("name")
@click.pass_obj
def add_sender(data_dir, name):
    """Allow a site to send files; prints its token (shown only this once)."""
    _add(data_dir, name, SENDER)


@cli.command("add-operator")
@click.argument("name")
@click.pass_obj
def add_operator(data_dir, name):
    """Allow someone at the TTP to list and download files; prints the token (shown only this once)."""
    _add(data_dir, name, OPERATOR)


@cli.command()
@click.argument("name")
@click.pass_obj
def revoke(data_dir, name):
    """Revoke a sender's or operator's token."""
    try:
        _inbox(data_dir).revoke_caller(name)
    except Refused as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"revoked {name}")


@cli.command("list-files")
@click.pass_obj
def list_files(data_dir):
    """Every received file: sender, name (TASK/NAME), size in bytes; export and delete take the sender and name
    as shown."""
    for entry in _inbox(data_dir).listing():
        click.echo(f"{entry['sender']}\t{entry['name']}\t{entry['size']}")


@cli.command()
@click.argument("sender")
@click.argument("name")
@click.argument("destination", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def export(data_dir, sender, name, destination):
    """Decrypt a received file with the service's private key (SENDER and NAME as list-files shows them)."""
    try:
        _inbox(data_dir).decrypt_to(sender, name, destination)
    except Refused as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"decrypted {sender}/{name} to {destination}")


@cli.command()
@click.argument("sender")
@click.argument("name")
@click.pass_obj
def delete(data_dir, sender, name):
    """Delete a received file (SENDER and NAME as list-files shows them); export it first to keep it."""
    try:
        size = _inbox(data_dir).delete(sender, name)
    except Refused as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"deleted {sender}/{name} ({size} bytes)")


if __name__ == "__main__":
    cli()
