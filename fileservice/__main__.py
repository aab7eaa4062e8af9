"""`pht-fileservice` and `python -m fileservice`: the FileService's commands, as `python fileservice/FileService.py`
runs them."""


def main():
    # gevent's server streams many uploads at once in one process; patch before anything imports I/O.
    from gevent import monkey
    monkey.patch_all()

    from fileservice.FileService import cli
    cli(prog_name="pht-fileservice")


if __name__ == "__main__":
    main()
