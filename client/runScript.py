"""The site runner of the Personal Health Train: run at a hospital, next to its data.

    python client/runScript.py --config config.json [--once]

It polls the registry (outbound HTTPS only), runs the tasks whose image the
site's whitelist allows, in contained Docker containers, and sends back their
results. See docs/site-config.md for the config file.
"""

import argparse
import logging
import signal
import sys
from pathlib import Path

# Run as a script (as in the original PyTaskManager), so make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import docker.errors  # noqa: E402

from client.containers import connect_engine  # noqa: E402
from client.registry_client import RegistryClient  # noqa: E402
from client.runner import SiteRunner  # noqa: E402
from client.site_config import ConfigError, load_site_config  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description="Personal Health Train site runner")
    parser.add_argument("--config", default="config.json", help="site config file (default: config.json)")
    parser.add_argument("--once", action="store_true", help="claim and finish at most one run, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_site_config(args.config)
    except ConfigError as error:
        sys.exit(str(error))
    try:
        engine = connect_engine()
    except docker.errors.DockerException as error:
        sys.exit(f"{args.config}: no Docker engine answers ({error}); start Docker, "
                 "and make sure this user may use it")
    runner = SiteRunner(config, engine, RegistryClient(config.registry_url, config.site_token))

    def stop_claiming(signum, _frame):
        logging.getLogger("pht.runner").info("signal %s: finishing the current run, claiming no more", signum)
        runner.stopping.set()

    signal.signal(signal.SIGINT, stop_claiming)
    signal.signal(signal.SIGTERM, stop_claiming)
    runner.run_until_stopped(once=args.once)


if __name__ == "__main__":
    main()
