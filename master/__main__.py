"""`pht-registry` and `python -m master`: the registry's commands, as `python master/TaskMaster.py` runs them."""


def main():
    # gevent's server parks each waiting long-poll as a greenlet; blocking I/O must be made cooperative
    # before anything else imports it, so the commands are imported only after.
    from gevent import monkey
    monkey.patch_all()

    from master.TaskMaster import cli
    cli(prog_name="pht-registry")


if __name__ == "__main__":
    main()
