"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): what a researcher and the operator
see and do, a hostile log, a changed URL, and the pages with JavaScript off.

The registry is the real one on a loopback port (conftest's served_app); sites speak its real site API
(tests/browser_sites.py). Every wait is Playwright's auto-waiting expect, on what the page shows. Screenshots
of each page go to the test's temporary folder.
"""

import gzip
import time

import pytest

from master import auth, store
from tests.browser import VIEWPORT, chromium_missing, launch_chromium, log_in
from tests.browser_sites import SimulatedSite, post_task
from tests.test_dashboard import assert_strict_policy

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: bash scripts/setup.sh")
expect = playwright_api.expect

NOT_YOURS = "There is no such page, or it is not yours to see."
HOSTILE_LOG = (b"starting\n<script>window.pwned = 1</script>\n<img src=x onerror=\"window.pwned = 2\">\n"
               b"</pre><b>bold?</b>\n")


@pytest.fixture(scope="module")
def browser():
    if chromium_missing():
        pytest.skip(chromium_missing())
    with playwright_api.sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def registry(app, served_app):
    # A site going offline is no event: the operator's page finds it by looking again, here every 0.2 s.
    app.config["DASHBOARD_RECHECK_SECONDS"] = 0.2
    return served_app


@pytest.fixture
def page(browser, registry):
    """A page whose every request must go to the registry under test."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    elsewhere = []
    context.on("request", lambda request: None if request.url.startswith(registry) else elsewhere.append(request.url))
    page = context.new_page()
    page.on("dialog", lambda dialog: pytest.fail(f"the page opened a dialog: {dialog.message}"))
    yield page
    context.close()
    assert not elsewhere, f"the dashboard asked for {elsewhere}"


def token(headers):
    return headers["Authorization"].split()[1]


@pytest.fixture
def three_sites(registry, make_site):
    return {name: SimulatedSite(registry, make_site(name), name) for name in ("hospital-a", "hospital-b", "hospital-c")}


def shoot(page, tmp_path, name):
    page.screenshot(path=tmp_path / f"{name}.png")


def test_a_researcher_follows_a_federated_task_opens_a_failure_downloads_and_cancels(
        page, registry, make_researcher, three_sites, tmp_path):
    alice = make_researcher("alice")
    task = post_task(registry, alice, list(three_sites), name="first look")
    three_sites["hospital-a"].run_to_the_end({"output.txt": b'{"n": 120}'}, b"counted 120 patients\n")
    three_sites["hospital-b"].run_to_the_end({"output.txt": b'{"n": 95}'}, b"counted 95 patients\n")
    three_sites["hospital-c"].run_to_the_end({}, b"querying\nonly 3 patients: below min_count 5\n", exit_code=3)
    running = post_task(registry, alice, ["hospital-a"], session_id=task["session_id"], name="second round")
    three_sites["hospital-a"].start(three_sites["hospital-a"].claim())

    log_in(page, registry, token(alice))
    expect(page.locator("h1")).to_have_text("My sessions")
    shoot(page, tmp_path, "sessions")
    page.click(f"text=Session {task['session_id']}")
    first_row = page.locator(f"#task-{task['id']}")
    expect(first_row.locator(".progress-words")).to_have_text("3 of 3 done")
    expect(page.locator(f"#task-{running['id']} .progress-words")).to_have_text("0 of 1 done")
    shoot(page, tmp_path, "session")

    first_row.locator("a").click()
    runs = page.locator("section.run")
    expect(runs).to_have_count(3)
    for site, state in (("hospital-a", "completed"), ("hospital-b", "completed"), ("hospital-c", "failed")):
        expect(page.locator(f"section.run[data-site={site}] h2 .state")).to_have_text(state)
    failed = page.locator("section.run[data-site=hospital-c]")
    expect(failed.locator(".reason-text")).to_have_text("algorithm exited with code 3")
    failed.locator("details.log summary").click()
    expect(failed.locator("pre.log-tail")).to_be_visible()
    expect(failed.locator("pre.log-tail")).to_contain_text("only 3 patients: below min_count 5")
    failed.locator("details.history summary").click()
    expect(failed.locator("details.history")).to_contain_text("claimed")
    shoot(page, tmp_path, "task")

    with page.expect_download() as downloading:
        page.locator("section.run[data-site=hospital-a] a.download", has_text="Output").click()
    archive = downloading.value.path().read_bytes()
    assert gzip.decompress(archive) and downloading.value.suggested_filename.endswith("-output.tar.gz")

    page.goto(f"{registry}/ui/tasks/{running['id']}")
    expect(page.locator("#task-state .state")).to_have_text("active")
    page.click("#cancel")
    expect(page.locator("#task-state .state")).to_have_text("cancelled")
    expect(page.locator("section.run .state").first).to_have_text("cancelled")
    expect(page.locator("#cancel")).to_have_count(0)


def test_a_link_from_another_site_does_not_log_the_researcher_out(browser, registry, make_researcher):
    context = browser.new_context(viewport=VIEWPORT)
    # Another site's page, answered by Playwright itself: nothing is asked of the network.
    other_site = "http://elsewhere.test/"
    context.route(other_site, lambda route: route.fulfill(
        content_type="text/html", body=f'<a id="to-dashboard" href="{registry}/ui/sessions">my tasks</a>'))
    page = context.new_page()
    try:
        log_in(page, registry, token(make_researcher("alice")))
        expect(page.locator("h1")).to_have_text("My sessions")
        page.goto(other_site)
        page.click("#to-dashboard")
        # A SameSite=Strict cookie does not come with another site's link: this visit is not logged in.
        expect(page.locator("h1")).to_have_text("Log in")
        page.goto(f"{registry}/ui/sessions")
        expect(page.locator("h1")).to_have_text("My sessions")
    finally:
        context.close()


def test_a_run_that_ends_shows_without_reloading_the_page(page, registry, make_researcher, three_sites, tmp_path):
    alice = make_researcher("alice")
    task = post_task(registry, alice, ["hospital-a", "hospital-b"])
    site = three_sites["hospital-a"]
    run = site.claim()
    site.start(run)
    log_in(page, registry, token(alice))
    page.goto(f"{registry}/ui/tasks/{task['id']}")
    expect(page.locator(".progress-words")).to_have_text("0 of 2 done")
    page.evaluate("window.sameDocument = true")  # gone if the page were loaded again
    site.upload(run, "log", b"done\n")
    site.finish(run)
    expect(page.locator("section.run[data-site=hospital-a] h2 .state")).to_have_text("completed")
    expect(page.locator(".progress-words")).to_have_text("1 of 2 done")
    assert page.evaluate("window.sameDocument") is True


def test_the_operator_sees_a_site_go_offline(app, page, registry, make_site, tmp_path):
    operator = store_operator(app)
    hospital = SimulatedSite(registry, make_site("hospital-a"), "hospital-a")
    hospital.claim()
    log_in(page, registry, operator)
    online = page.locator("tr[data-site=hospital-a] td.online")
    expect(online).to_have_text("online")
    expect(page.locator("tr[data-site=hospital-a] td.sparql")).to_have_text("OK")
    shoot(page, tmp_path, "operator-sites")
    # The site stops polling: its last poll is now longer ago than the online window.
    engine = app.extensions["pht"].engine
    [site_id] = [site["id"] for site in store.list_sites(engine)[0] if site["name"] == "hospital-a"]
    store.record_site_seen(engine, site_id, "sim-1.0", True, now=time.time() - 10 * app.extensions[
        "pht"].settings.online_window_seconds)
    expect(online).to_have_text("offline")
    page.click("nav >> text=Tasks")
    expect(page.locator("h1")).to_have_text("Tasks")
    shoot(page, tmp_path, "operator-tasks")


def store_operator(app):
    operator_token = auth.new_token()
    store.create_principal(app.extensions["pht"].engine, store.OPERATOR, "olivia", auth.hash_token(operator_token))
    return operator_token


def test_a_log_with_script_shows_as_text(page, registry, make_researcher, three_sites, tmp_path):
    alice = make_researcher("alice")
    task = post_task(registry, alice, ["hospital-a"])
    three_sites["hospital-a"].run_to_the_end({}, HOSTILE_LOG, exit_code=1)
    log_in(page, registry, token(alice))
    answer = page.goto(f"{registry}/ui/tasks/{task['id']}")
    assert_strict_policy(answer.headers["content-security-policy"])  # what would stop a script that slipped through
    page.locator("details.log summary").click()
    tail = page.locator("pre.log-tail")
    expect(tail).to_contain_text("<script>window.pwned = 1</script>")
    expect(tail).to_contain_text('<img src=x onerror="window.pwned = 2">')
    expect(tail).to_contain_text("</pre><b>bold?</b>")
    assert page.locator("section.run img, section.run b, section.run script").count() == 0
    assert page.evaluate("window.pwned") is None
    shoot(page, tmp_path, "hostile-log")


def test_a_researcher_cannot_see_another_researchers_task_by_changing_the_url(
        page, registry, make_researcher, three_sites, tmp_path):
    alice, bob = make_researcher("alice"), make_researcher("bob")
    task = post_task(registry, alice, ["hospital-a"])
    run = three_sites["hospital-a"].run_to_the_end({"output.txt": b"alice's secret"}, b"alice's log\n")
    log_in(page, registry, token(bob))
    expect(page.locator("h1")).to_have_text("My sessions")
    for path in (f"/ui/tasks/{task['id']}", f"/ui/sessions/{task['session_id']}", f"/ui/runs/{run['id']}/log",
                 f"/ui/runs/{run['id']}/output", "/ui/tasks/4242"):
        answer = page.goto(f"{registry}{path}")
        assert answer.status == 404, path
        expect(page.locator("#problem")).to_have_text(NOT_YOURS)
        expect(page.locator("body")).not_to_contain_text("alice")
    shoot(page, tmp_path, "not-yours")


def test_the_dashboard_works_with_javascript_off(browser, registry, make_researcher, three_sites, tmp_path):
    context = browser.new_context(viewport=VIEWPORT, java_script_enabled=False)
    page = context.new_page()
    try:
        alice = make_researcher("alice")
        task = post_task(registry, alice, ["hospital-a", "hospital-b"])
        three_sites["hospital-a"].run_to_the_end({}, b"failing here\n", exit_code=2)
        log_in(page, registry, token(alice))
        expect(page.locator("h1")).to_have_text("My sessions")
        page.click(f"text=Session {task['session_id']}")
        page.click(f"#task-{task['id']} a")
        failed = page.locator("section.run[data-site=hospital-a]")
        expect(failed.locator(".reason-text")).to_have_text("algorithm exited with code 2")
        failed.locator("details.log summary").click()
        expect(failed.locator("pre.log-tail")).to_have_text("failing here")
        page.click("#cancel")
        expect(page.locator("#task-state .state")).to_have_text("finished with errors")
        expect(page.locator("section.run[data-site=hospital-b] h2 .state")).to_have_text("cancelled")
        shoot(page, tmp_path, "no-javascript")
        page.click("form.who button")
        expect(page.locator("h1")).to_have_text("Log in")
        page.goto(f"{registry}/ui/sessions")
        expect(page.locator("h1")).to_have_text("Log in")
    finally:
        context.close()
