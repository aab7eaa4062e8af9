"""Screenshots of each dashboard page for docs/dashboard.md: `.venv/bin/python -m scripts.dashboard_screenshots`.

Starts a real registry on a loopback port with example data (an iterative analysis at three sites, a fourth site
gone offline), lets simulated sites report through the real site API, and saves one 1280x800 PNG per page into
docs/dashboard/ with Debian's Chromium (bash scripts/setup.sh installs it). Nothing leaves loopback.
"""

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from werkzeug.serving import make_server

from master import auth, store
from master.app import Settings, create_app
from tests.browser import VIEWPORT, chromium_missing, launch_chromium, log_in
from tests.browser_sites import SimulatedSite, post_task

ROOT = Path(__file__).resolve().parent.parent
SITES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")


def registered(engine, role, name):
    token = auth.new_token()
    store.create_principal(engine, role, name, auth.hash_token(token))
    return token


def example_data(url, engine, settings):
    """A researcher's session of three rounds (done; one site failed; under way), a colleague's task, an offline
    site. Returns the tokens to log in with and the ids of what to show."""
    alice, bob = (registered(engine, store.RESEARCHER, name) for name in ("alice", "bob"))
    sites = {name: SimulatedSite(url, {"Authorization": f"Bearer {registered(engine, store.SITE, name)}"}, name)
             for name in SITES}
    three = list(SITES[:3])
    as_alice = {"Authorization": f"Bearer {alice}"}
    first = post_task(url, as_alice, three, name="summary of age")
    for name, patients in zip(three, (120, 95, 143)):
        sites[name].run_to_the_end({"output.txt": b'{"n": %d}' % patients}, b"counted %d patients\n" % patients)
    second = post_task(url, as_alice, three, session_id=first["session_id"], name="logistic regression, round 1")
    read = {"queries": 4, "bytes": 1_840_000, "refused": 0}
    sites["hospital-a"].run_to_the_end({"output.txt": b'{"beta": [0.1, 0.4]}'}, b"newton step 1 done\n", sparql=read)
    sites["hospital-b"].run_to_the_end({"output.txt": b'{"beta": [0.2, 0.3]}'}, b"newton step 1 done\n", sparql=read)
    sites["hospital-c"].run_to_the_end({}, b"reading cohort\nquerying stage, age\nonly 3 patients in stage IV: "
                                           b"below min_count 5; lower min_count or merge stages\n", exit_code=3)
    third = post_task(url, as_alice, three, session_id=first["session_id"], name="logistic regression, round 2")
    sites["hospital-a"].run_to_the_end({"output.txt": b'{"beta": [0.12, 0.41]}'}, b"newton step 2 done\n")
    sites["hospital-b"].start(sites["hospital-b"].claim())
    colleagues = post_task(url, {"Authorization": f"Bearer {bob}"}, ["hospital-b", "hospital-d"], name="patient count")
    sites["hospital-d"].claim(sparql_ok=False)
    [offline] = [site["id"] for site in store.list_sites(engine)[0] if site["name"] == "hospital-d"]
    store.record_site_seen(engine, offline, "sim-1.0", False, now=time.time() - 3 * settings.online_window_seconds)
    return {"alice": alice, "operator": registered(engine, store.OPERATOR, "olivia"),
            "session": first["session_id"], "failed_task": second["id"], "running_task": third["id"],
            "colleagues_task": colleagues["id"]}


def screenshots(url, shown, out):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"{url}/ui/login")
        page.screenshot(path=out / "login.png")
        log_in(page, url, shown["alice"])
        page.screenshot(path=out / "sessions.png")
        page.goto(f"{url}/ui/sessions/{shown['session']}")
        page.screenshot(path=out / "session.png")
        page.goto(f"{url}/ui/tasks/{shown['failed_task']}")
        failed = page.locator("section.run[data-site=hospital-c]")
        failed.locator("details.history summary").click()
        failed.locator("details.log summary").click()
        page.screenshot(path=out / "task.png")
        page.goto(f"{url}/ui/tasks/{shown['running_task']}")
        page.screenshot(path=out / "task-running.png")
        page.goto(f"{url}/ui/sites")
        page.screenshot(path=out / "sites.png")
        page.goto(f"{url}/ui/tasks/{shown['colleagues_task']}")  # bob's: the same page as a task that does not exist
        page.screenshot(path=out / "not-found.png")
        page.click("form.who button")
        log_in(page, url, shown["operator"])
        page.screenshot(path=out / "operator-sites.png")
        page.goto(f"{url}/ui/operator/tasks")
        page.screenshot(path=out / "operator-tasks.png")
        browser.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard", help="Where the PNGs go.")
    arguments = parser.parse_args()
    if chromium_missing():
        sys.exit(chromium_missing())
    arguments.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=Path(data_dir) / "registry")
        app = create_app(settings)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}"
        try:
            screenshots(url, example_data(url, app.extensions["pht"].engine, settings), arguments.out)
        finally:
            server.shutdown()
            app.extensions["pht"].engine.dispose()
    print(f"screenshots in {arguments.out}")


if __name__ == "__main__":
    main()
