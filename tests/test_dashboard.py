"""The dashboard at /ui/ without a browser: who may log in and see what, the cookie, CSRF, escaping, headers.

The attacker's tests come first: a hostile site or algorithm (script in a log, a reason, a site name), a
researcher changing ids in URLs, forms posted without the visit's CSRF token, forged and expired cookies, and a
revoked token's cookie. Sites are simulated through the registry's real site API (tests/browser_sites.py).
"""

import re
import threading
import time

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from itsdangerous import URLSafeSerializer

from master import auth, lifecycle, store, wakeup
from master.TaskMaster import cli
from master.dashboard import live, login, looks
from tests.browser_sites import SimulatedSite, post_task
from tests.conftest import _bearer_for as bearer_for
from tests.test_api_docs import PageParts

HOSTILE = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


def token_of(headers):
    return headers["Authorization"].split()[1]


def csrf_of(response):
    found = re.search(r'name="csrf" value="([^"]+)"', response.get_data(as_text=True))
    assert found, f"{response.request.path} has no form with a CSRF token"
    return found.group(1)


def log_in(client, headers):
    answer = client.post("/ui/login", data={"csrf": csrf_of(client.get("/ui/login")), "token": token_of(headers)})
    assert answer.status_code == 303, answer.get_data(as_text=True)
    return answer


def text(response):
    return response.get_data(as_text=True)


@pytest.fixture
def alice(make_researcher):
    return make_researcher("alice")


@pytest.fixture
def bob(make_researcher):
    return make_researcher("bob")


@pytest.fixture
def sites(served_app, make_site):
    return {name: SimulatedSite(served_app, make_site(name), name) for name in ("hospital-a", "hospital-b")}


@pytest.fixture
def operator(app):
    return bearer_for(app, store.OPERATOR, "olivia")


@pytest.fixture
def finished_task(served_app, alice, sites):
    """Alice's task: hospital-a completed it, hospital-b failed it with a hostile reason and log."""
    task = post_task(served_app, alice, ["hospital-a", "hospital-b"])
    sites["hospital-a"].run_to_the_end({"output.txt": b'{"n": 10}'}, b"counted 10 patients\n")
    sites["hospital-b"].run_to_the_end({}, b"line one\n" + HOSTILE.encode() + b"\n\x1b]0;title\x07 \xe2\x80\xae evil\n",
                                       exit_code=None, failure_reason="crashed: " + HOSTILE)
    return task


# --- a hostile site or algorithm -----------------------------------------------------------------------------

def test_script_in_a_log_and_a_reason_is_shown_as_text(client, alice, finished_task):
    log_in(client, alice)
    page = text(client.get(f"/ui/tasks/{finished_task['id']}"))
    assert "<script>alert" not in page and "<img src=x" not in page
    # The reason, the reason in the run's history, and the log's tail:
    assert page.count("&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;") == 3
    assert "\\x1b]0;title\\x07" in page and "\\u202e evil" in page  # control characters spelled out
    assert not PageParts(page).inline_code


def test_script_in_a_site_name_is_shown_as_text(app, client, alice, operator, served_app, sites):
    # Names are DNS labels today; a registry's older database may hold anything.
    with app.extensions["pht"].engine.begin() as conn:
        conn.execute(store.sites.insert().values(name=HOSTILE, token_hash="f" * 64, created_at=time.time()))
    task = post_task(served_app, alice, [HOSTILE, "hospital-a"])
    log_in(client, alice)
    for path in (f"/ui/tasks/{task['id']}", f"/ui/sessions/{task['session_id']}"):
        page = text(client.get(path))
        assert "<script>alert" not in page and "&lt;script&gt;" in page, path
    client.post("/ui/logout", data={"csrf": csrf_of(client.get("/ui/sessions"))})
    log_in(client, operator)
    for path in ("/ui/operator/sites", "/ui/operator/tasks"):
        page = text(client.get(path))
        assert "<script>alert" not in page and "&lt;script&gt;" in page, path


def markup(field):
    return f'<u class="{field}">{field}</u>'


def escaped_markup(field):
    return f"&lt;u class=&#34;{field}&#34;&gt;{field}&lt;/u&gt;"


# What a site may send as its runner's version (printable ASCII): markup and both quotes.
MARKUP_VERSION = "<b>v</b>\"'"


def test_markup_in_every_field_from_a_site_an_algorithm_or_a_name_is_shown_as_text(
        app, client, served_app, sites, operator):
    researcher_token = auth.new_token()
    with app.extensions["pht"].engine.begin() as conn:  # a name the registry refuses today; an old database's
        conn.execute(store.researchers.insert().values(name=markup("researcher"), created_at=time.time(),
                                                       token_hash=auth.hash_token(researcher_token)))
    researcher = {"Authorization": f"Bearer {researcher_token}"}
    task = post_task(served_app, researcher, ["hospital-a"], name=markup("name"), description=markup("description"))
    with app.extensions["pht"].engine.begin() as conn:  # an image reference the API refuses
        conn.execute(store.tasks.update().where(store.tasks.c.id == task["id"]).values(image=markup("image")))
    site = sites["hospital-a"]
    site.refuse(site.claim(runner_version=MARKUP_VERSION), markup("reason"))

    def assert_shown_as_text(path, fields):
        page = text(client.get(path))
        for field in fields:
            assert markup(field) not in page and escaped_markup(field) in page, (path, field)
        return page

    log_in(client, researcher)
    assert_shown_as_text(f"/ui/tasks/{task['id']}", ["researcher", "name", "description", "image", "reason"])
    page = assert_shown_as_text("/ui/sites", ["researcher"])
    assert MARKUP_VERSION not in page and "&lt;b&gt;v&lt;/b&gt;&#34;&#39;" in page, "/ui/sites: runner version"
    client.post("/ui/logout", data={"csrf": _csrf(client)})
    log_in(client, operator)
    assert_shown_as_text("/ui/operator/tasks", ["researcher", "name", "image", "reason"])
    page = assert_shown_as_text("/ui/operator/sites", [])
    assert MARKUP_VERSION not in page and "&lt;b&gt;v&lt;/b&gt;&#34;&#39;" in page, "/ui/operator/sites: runner version"


# --- a researcher changing ids in URLs -----------------------------------------------------------------------

def test_another_researchers_task_run_session_and_downloads_answer_as_if_they_did_not_exist(
        client, bob, finished_task):
    log_in(client, bob)
    run_id = finished_task["runs"][0]["id"]
    for path in ("/ui/tasks/{}", "/ui/sessions/{}", "/ui/runs/{}/output", "/ui/runs/{}/log", "/ui/live/tasks/{}",
                 "/ui/live/sessions/{}"):
        real_id = run_id if "/runs/" in path else finished_task["session_id"] if "sessions" in path \
            else finished_task["id"]
        theirs, nobodys = client.get(path.format(real_id)), client.get(path.format(99999))
        assert theirs.status_code == nobodys.status_code == 404, path
        assert text(theirs) == text(nobodys), path
        assert "counted" not in text(theirs) and "hospital" not in text(theirs)
    assert client.post(f"/ui/tasks/{finished_task['id']}/cancel", data={"csrf": _csrf(client)}).status_code == 404


def _csrf(client):
    return csrf_of(client.get("/ui/sessions"))


def test_a_researcher_cannot_cancel_another_researchers_running_task(client, served_app, alice, bob, sites):
    task = post_task(served_app, alice, ["hospital-a"])
    sites["hospital-a"].start(sites["hospital-a"].claim())
    log_in(client, bob)
    assert client.post(f"/ui/tasks/{task['id']}/cancel", data={"csrf": _csrf(client)}).status_code == 404
    assert client.get(f"/api/tasks/{task['id']}", headers=alice).json["runs"][0]["status"] == "running"


# --- forms without the visit's CSRF token ----------------------------------------------------------------------

def test_a_post_without_the_visits_csrf_token_changes_nothing(client, served_app, alice, sites):
    task = post_task(served_app, alice, ["hospital-a"])
    log_in(client, alice)
    for form in ({}, {"csrf": ""}, {"csrf": "guessed"}, {"csrf": _csrf(client) + "x"}):
        answer = client.post(f"/ui/tasks/{task['id']}/cancel", data=form)
        assert answer.status_code == 400 and "reload the page" in text(answer), form
    assert client.get(f"/api/tasks/{task['id']}", headers=alice).json["status"] == "active"
    assert client.post(f"/ui/tasks/{task['id']}/cancel", data={"csrf": _csrf(client)}).status_code == 303
    assert client.get(f"/api/tasks/{task['id']}", headers=alice).json["status"] == "cancelled"


def test_logging_in_and_out_needs_the_visits_csrf_token(client, alice):
    assert client.post("/ui/login", data={"token": token_of(alice)}).status_code == 400
    assert client.get("/ui/sessions").status_code == 302
    log_in(client, alice)
    assert client.post("/ui/logout", data={}).status_code == 400
    assert client.get("/ui/sessions").status_code == 200


def test_another_visits_csrf_token_does_not_do(app, client, alice):
    other = app.test_client()
    foreign = csrf_of(other.get("/ui/login"))
    assert client.get("/ui/login").status_code == 200
    assert client.post("/ui/login", data={"csrf": foreign, "token": token_of(alice)}).status_code == 400


# --- the cookie ------------------------------------------------------------------------------------------------

def set_cookie_header(response):
    [cookie] = [value for name, value in response.headers.items() if name == "Set-Cookie"]
    return cookie


def cookies_set_by(response):
    return [value.split("=", 1)[0] for name, value in response.headers.items() if name == "Set-Cookie"]


def test_a_visit_without_cookies_leaves_the_session_cookie_alone(app):
    # A link from another site arrives without the SameSite=Strict session cookie: answering it must not
    # overwrite the session cookie the browser still holds. The login form's CSRF token has a cookie of its own.
    for path in ("/ui/login", "/ui/sessions", "/ui/", "/ui/nowhere"):
        assert cookies_set_by(app.test_client().get(path)) == ["pht_dashboard_login"], path


def test_the_cookie_is_httponly_samesite_strict_and_holds_no_token(client, alice):
    cookie = set_cookie_header(log_in(client, alice))
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in attributes and "samesite=strict" in attributes and "path=/ui/" in attributes
    assert "secure" not in attributes  # plain HTTP on loopback: a Secure cookie would never come back
    value = cookie.split(";")[0].split("=", 1)[1]
    _, payload = URLSafeSerializer("any key: the payload is read unverified").loads_unsafe(value)
    assert token_of(alice) not in str(payload) and payload["t"] == auth.hash_token(token_of(alice))


@pytest.mark.parametrize("how", [{"base_url": "https://localhost"}, {"headers": {"X-Forwarded-Proto": "https"}}])
def test_the_cookies_are_secure_over_tls(client, alice, how):
    login_cookie = set_cookie_header(client.get("/ui/login", **how))
    csrf = re.search(r'name="csrf" value="([^"]+)"', text(client.get("/ui/login", **how))).group(1)
    session_cookie = set_cookie_header(client.post("/ui/login", data={"csrf": csrf, "token": token_of(alice)}, **how))
    for cookie in (login_cookie, session_cookie):
        assert "secure" in [part.strip().lower() for part in cookie.split(";")], cookie


def cookie_signed_with(secret, visit):
    return login.cookie_value(login.cookie_signer(secret), visit)


def test_a_forged_or_tampered_cookie_is_no_session(app, client, alice):
    hashed = auth.hash_token(token_of(alice))
    right_key_wrong_purpose = URLSafeSerializer(app.config["DASHBOARD_COOKIE_SECRET"], salt="another")
    for value in (cookie_signed_with("not the registry's key", login.logged_in(hashed, time.time())),
                  right_key_wrong_purpose.dumps({"c": "x", "t": hashed}),
                  "garbage", "a.b.c"):
        client.set_cookie(login.COOKIE_NAME, value, path="/ui/")
        answer = client.get("/ui/sessions")
        assert answer.status_code == 302 and answer.headers["Location"].startswith("/ui/login"), value
        assert client.get_cookie(login.COOKIE_NAME, path="/ui/") is None, value  # deleted: not sent again


def test_a_cookie_signed_with_the_registrys_key_naming_a_sites_token_is_no_session(app, client, make_site):
    # Only a leaked key could sign it; the token behind it still gets no page, whatever its role could see.
    site_hash = auth.hash_token(token_of(make_site("hospital-a")))
    client.set_cookie(login.COOKIE_NAME, path="/ui/", value=cookie_signed_with(
        app.config["DASHBOARD_COOKIE_SECRET"], login.logged_in(site_hash, time.time())))
    for path in ("/ui/sessions", "/ui/operator/sites", "/ui/live/sites"):
        answer = client.get(path)
        assert answer.status_code in (302, 401) and "hospital-a" not in text(answer), path


def test_a_session_expires_after_eight_hours(app, client, alice):
    secret, hashed = app.config["DASHBOARD_COOKIE_SECRET"], auth.hash_token(token_of(alice))
    client.set_cookie(login.COOKIE_NAME, path="/ui/", value=cookie_signed_with(
        secret, login.logged_in(hashed, time.time() - login.SESSION_SECONDS + 60)))
    assert client.get("/ui/sessions").status_code == 200
    client.set_cookie(login.COOKIE_NAME, path="/ui/", value=cookie_signed_with(
        secret, login.logged_in(hashed, time.time() - login.SESSION_SECONDS - 1)))
    answer = client.get("/ui/sessions", follow_redirects=True)
    assert "Your session ended; log in again." in text(answer)


def test_expiry_is_decided_by_the_clock_passed_in():
    visit = login.logged_in("a" * 64, now=1000.0)
    assert not login.is_expired(visit, now=1000.0)
    assert not login.is_expired(visit, now=1000.0 + login.SESSION_SECONDS - 1)
    assert login.is_expired(visit, now=1000.0 + login.SESSION_SECONDS)
    assert login.is_expired(visit, now=999.0)  # issued in the future: not believed
    assert not login.is_expired(login.new_visit(), now=0)


def test_a_revoked_or_rotated_tokens_cookie_stops_working_at_once(app, client, alice):
    log_in(client, alice)
    assert client.get("/ui/sessions").status_code == 200
    store.revoke_principal(app.extensions["pht"].engine, store.RESEARCHER, "alice")
    assert client.get("/ui/sessions").status_code == 302
    store.replace_token(app.extensions["pht"].engine, store.RESEARCHER, "alice", auth.hash_token("pht_new"))
    assert client.get("/ui/sessions").status_code == 302  # the old token's cookie does not come back


def test_log_out_ends_the_session_in_this_browser(client, alice):
    log_in(client, alice)
    answer = client.post("/ui/logout", data={"csrf": _csrf(client)})
    assert answer.status_code == 303 and answer.headers["Location"] == "/ui/login"
    assert client.get("/ui/sessions").status_code == 302


def test_the_cookie_key_survives_a_restart_and_is_shared_by_replicas(app, tmp_path):
    from master.app import Settings, create_app
    database_url = str(app.extensions["pht"].engine.url)
    again = create_app(Settings(data_dir=tmp_path / "replica", database_url=database_url))
    try:
        assert again.config["DASHBOARD_COOKIE_SECRET"] == app.config["DASHBOARD_COOKIE_SECRET"]
        assert len(app.config["DASHBOARD_COOKIE_SECRET"]) == 64
    finally:
        again.extensions["pht"].engine.dispose()


# --- logging in ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("token, status, words", [
    ("", 400, "Paste the token"), ("pht_unknown", 401, "unknown, or it was revoked"), ("x" * 600, 400, "Paste")])
def test_a_bad_token_gets_a_clear_message(client, token, status, words):
    answer = client.post("/ui/login", data={"csrf": csrf_of(client.get("/ui/login")), "token": token})
    assert answer.status_code == status and words in text(answer)


def test_who_may_log_in_is_decided_without_a_server():
    assert login.refusal(False, None)[1] == 400
    assert login.refusal(True, None)[1] == 401
    assert login.refusal(True, (store.SITE, 1, "hospital-a"))[1] == 403
    assert login.refusal(True, (store.RESEARCHER, 1, "alice")) is None
    assert login.refusal(True, (store.OPERATOR, 1, "olivia")) is None


def test_a_sites_token_cannot_log_in(client, make_site):
    answer = client.post("/ui/login", data={"csrf": csrf_of(client.get("/ui/login")),
                                            "token": token_of(make_site("hospital-a"))})
    assert answer.status_code == 403 and "A site&#39;s token cannot log in here" in text(answer)
    assert client.get("/ui/sessions").status_code == 302


def test_each_role_sees_only_its_own_pages(client, alice, operator):
    log_in(client, alice)
    assert client.get("/ui/").headers["Location"] == "/ui/sessions"
    for path in ("/ui/operator/sites", "/ui/operator/tasks", "/ui/live/operator/sites", "/ui/live/operator/tasks"):
        assert client.get(path).status_code == 403, path
    client.post("/ui/logout", data={"csrf": _csrf(client)})
    log_in(client, operator)
    assert client.get("/ui/").headers["Location"] == "/ui/operator/sites"
    for path in ("/ui/sessions", "/ui/sites", "/ui/tasks/1", "/ui/runs/1/log", "/ui/live/sites"):
        assert client.get(path).status_code == 403, path


# --- headers ------------------------------------------------------------------------------------------------------

def assert_strict_policy(header):
    """The Content-Security-Policy a dashboard page must carry: nothing by default, no inline or eval'd code, no
    data: URLs, nothing from another origin, no framing. Read from the header, not from the code that sends it."""
    policy = {}
    for directive in header.split(";"):
        name, *sources = directive.split()
        policy[name] = sources
    assert policy["default-src"] == ["'none'"], header
    assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"], header
    assert policy["frame-ancestors"] == ["'none'"] and policy["base-uri"] == ["'none'"], header
    allowed = [source for sources in policy.values() for source in sources]
    assert set(allowed) <= {"'self'", "'none'"}, header


def test_every_answer_carries_a_strict_policy_and_pages_are_not_cached(client, alice, finished_task):
    log_in(client, alice)
    paths = ["/ui/login", "/ui/sessions", f"/ui/sessions/{finished_task['session_id']}",
             f"/ui/tasks/{finished_task['id']}", "/ui/tasks/999", "/ui/nowhere", "/ui/static/dashboard.css"]
    for path in paths:
        answer = client.get(path)
        assert_strict_policy(answer.headers["Content-Security-Policy"])
        assert answer.headers["X-Content-Type-Options"] == "nosniff", path
        assert answer.headers["Referrer-Policy"] == "no-referrer", path
        if "static" not in path:
            assert answer.headers["Cache-Control"] == "no-store", path
            parts = PageParts(text(answer))
            assert not parts.inline_code, f"{path}: {parts.inline_code}"
            assert all(url.startswith("/ui/") for url in parts.urls), f"{path} links out: {parts.urls}"
    for name, kind in (("dashboard.css", "text/css"), ("live.js", "text/javascript")):
        assert client.get(f"/ui/static/{name}").mimetype == kind
    # A run's output and log are the researcher's data: no cache along the way keeps a copy.
    for kind in ("output", "log"):
        downloaded = client.get(f"/ui/runs/{finished_task['runs'][0]['id']}/{kind}")
        assert downloaded.status_code == 200 and downloaded.headers.get("Cache-Control") == "no-store", kind


# --- what a researcher sees ------------------------------------------------------------------------------------

def test_a_researcher_sees_sessions_tasks_in_rounds_and_each_sites_run(client, served_app, alice, sites, finished_task):
    second = post_task(served_app, alice, ["hospital-a"], session_id=finished_task["session_id"], name="round two")
    log_in(client, alice)
    assert f"Session {finished_task['session_id']}" in text(client.get("/ui/sessions"))
    session = text(client.get(f"/ui/sessions/{finished_task['session_id']}"))
    assert session.index(f"Task {finished_task['id']}") < session.index(f"Task {second['id']}: round two")
    assert "1 of 2 done" not in session and "2 of 2 done" in session and "0 of 1 done" in session
    page = text(client.get(f"/ui/tasks/{finished_task['id']}"))
    assert 'class="state state-ok" data-state="completed"' in page
    assert 'class="state state-bad" data-state="failed"' in page
    assert "counted 10 patients" in page and "crashed: " in page
    downloaded = client.get(f"/ui/runs/{finished_task['runs'][0]['id']}/output")
    assert downloaded.status_code == 200 and downloaded.data[:2] == b"\x1f\x8b"
    assert downloaded.headers["Content-Disposition"].startswith("attachment")


def test_a_researcher_sees_the_sites_as_the_api_lists_them(app, client, alice, sites):
    sites["hospital-a"].claim(sparql_ok=False)
    store.revoke_principal(app.extensions["pht"].engine, store.SITE, "hospital-b")
    listed = client.get("/api/sites", headers=alice).json["items"]
    log_in(client, alice)
    page = text(client.get("/ui/sites"))
    assert [site["name"] for site in listed] == ["hospital-a"] and "hospital-b" not in page
    row = re.search(r'<tr data-site="hospital-a">(.*?)</tr>', page, re.S).group(1)
    assert 'id="site-' not in page  # the registry's internal ids, which the API never shows
    assert "online" in row and "failing" in row and "sim-1.0" in row and "just now" in row
    assert "Active runs" not in page  # the operator's column: not in what a researcher's token sees
    assert "less than\n2 min old" in page


def live_url_of(page):
    return re.search(r'data-live-url="([^"]+)"', page).group(1).replace("&amp;", "&")


def test_the_sites_pages_show_every_site_a_page_at_a_time(app, client, alice, operator):
    with app.extensions["pht"].engine.begin() as conn:
        conn.execute(store.sites.insert(), [{"name": f"site-{n:03d}", "token_hash": f"{n:064x}",
                                             "created_at": time.time()} for n in range(250)])
    for who, path in ((alice, "/ui/sites"), (operator, "/ui/operator/sites")):
        log_in(client, who)
        first, second = text(client.get(path)), text(client.get(f"{path}?page=2"))
        assert "250 sites." in first and "250 sites." in second, path
        assert 'data-site="site-000"' in first and 'data-site="site-249"' not in first, path
        assert 'data-site="site-249"' in second and 'data-site="site-000"' not in second, path
        assert f'href="{path}?page=2"' in first and f'href="{path}?page=1"' in second, path
        # The live wait watches the page shown, not the first one.
        live_answer = client.get(live_url_of(second) + "&since=")
        assert live_answer.json["fingerprint"] == page_fingerprint(second), path
        assert client.get(f"{path}?page=3").status_code == 400, path
        client.post("/ui/logout", data={"csrf": csrf_of(client.get(path))})


def test_a_run_shows_what_it_read_through_sparql_and_what_it_sent_to_a_third_party(client, served_app, alice, sites):
    task = post_task(served_app, alice, ["hospital-a"])
    site = sites["hospital-a"]
    run = site.claim()
    site.start(run)
    site.deliver(run, "ttp", "counts.csv", b"x" * 3400)
    site.finish(run, sparql={"queries": 12, "bytes": 3_400_000, "refused": 1})
    log_in(client, alice)
    page = text(client.get(f"/ui/tasks/{task['id']}"))
    assert "SPARQL: 12 queries, 3.4 MB read, 1 refused" in page
    assert "sent <code>counts.csv</code> (3.4 kB) to ttp" in page


def test_an_encrypted_tasks_page_says_to_open_it_with_the_key(client, served_app, alice, sites):
    key = "age1" + "q" * 58
    assert client.post("/api/keys", json={"public_key": key}, headers=alice).status_code == 201
    task = post_task(served_app, alice, ["hospital-a"], encrypt=True)
    sites["hospital-a"].run_to_the_end({"output.txt": b"ciphertext really"}, b"age-encrypted bytes")
    log_in(client, alice)
    page = text(client.get(f"/ui/tasks/{task['id']}"))
    assert "The results are encrypted" in page and "--identity" in page
    assert "age-encrypted bytes" not in page  # no tail of a log the registry cannot read
    assert "Output (encrypted)" in page


def test_bad_input_gets_a_clear_message_and_never_a_500(client, alice, operator):
    log_in(client, alice)
    for path, status in (("/ui/sessions?page=0", 400), ("/ui/sessions?page=x", 400), ("/ui/sessions?page=²", 400),
                         ("/ui/tasks/abc", 404),
                         ("/ui/tasks/99999999999999999999", 404), ("/ui/live/tasks/1?since=zz", 404),
                         ("/ui/static/../../app.py", 404)):
        assert client.get(path).status_code == status, path
    client.post("/ui/logout", data={"csrf": _csrf(client)})
    log_in(client, operator)
    for query, words in (("status=odd", "status: Must be one of"), ("site=%3Cb%3E", "site: must be a name"),
                         ("page=-1", "page:")):
        answer = client.get(f"/ui/operator/tasks?{query}")
        assert answer.status_code == 400 and words in text(answer), query
    assert client.get("/ui/live/operator/sites?since=not-hex").status_code == 400


# --- the operator ------------------------------------------------------------------------------------------------

def test_the_operator_sees_every_site_and_task_as_the_api_shows_them(client, served_app, operator, alice, bob, sites):
    first = post_task(served_app, alice, ["hospital-a", "hospital-b"])
    post_task(served_app, bob, ["hospital-b"])
    sites["hospital-a"].run_to_the_end({"output.txt": b"{}"}, b"done\n")
    sites["hospital-b"].claim(sparql_ok=False)

    api_sites = client.get("/api/operator/sites", headers=operator).json["items"]
    assert [(s["name"], s["online"], s["sparql_ok"], s["runner_version"], s["active_runs"]) for s in api_sites] == [
        ("hospital-a", True, True, "sim-1.0", 0), ("hospital-b", True, False, "sim-1.0", 2)]
    listed = client.get("/api/operator/tasks", headers=operator, query_string={"researcher": "alice"}).json
    assert [(t["id"], t["researcher"]) for t in listed["items"]] == [(first["id"], "alice")]
    assert client.get("/api/operator/tasks", headers=operator, query_string={"site": "hospital-a"}).json["total"] == 1
    assert client.get("/api/operator/tasks", headers=operator, query_string={"status": "active"}).json["total"] == 2

    log_in(client, operator)
    page = text(client.get("/ui/operator/sites"))
    assert page.count('<span class="state state-ok">online</span>') == 2 and "failing" in page
    tasks_page = text(client.get("/ui/operator/tasks?researcher=bob"))
    assert "bob" in tasks_page and f"Task {first['id']}" not in tasks_page
    assert client.post("/ui/tasks/1/cancel", data={"csrf": _csrf_operator(client)}).status_code == 403


def _csrf_operator(client):
    return csrf_of(client.get("/ui/operator/sites"))


def test_only_an_operators_token_reads_the_operator_api(client, alice, make_site):
    for headers, status in ((alice, 403), (make_site("hospital-a"), 403), ({}, 401)):
        for path in ("/api/operator/sites", "/api/operator/tasks"):
            assert client.get(path, headers=headers).status_code == status, path


def test_create_operator_prints_a_token_once_and_revoke_ends_it(tmp_path):
    data = ["--data-dir", str(tmp_path / "registry")]
    made = CliRunner().invoke(cli, ["create-operator", "olivia", *data], env={"PHT_DATABASE_URL": None})
    assert made.exit_code == 0 and made.stdout.startswith("pht_")
    listed = CliRunner().invoke(cli, ["list-operators", *data], env={"PHT_DATABASE_URL": None})
    assert listed.stdout.startswith("olivia\tactive")
    revoked = CliRunner().invoke(cli, ["revoke", "olivia", *data], env={"PHT_DATABASE_URL": None})
    assert revoked.exit_code == 0 and revoked.stdout == "revoked operator olivia\n"
    rotated = CliRunner().invoke(cli, ["rotate-token", "olivia", "--operator", *data], env={"PHT_DATABASE_URL": None})
    assert rotated.exit_code == 0 and rotated.stdout.startswith("pht_")


# --- live updates ---------------------------------------------------------------------------------------------------

def page_fingerprint(page):
    return re.search(r'data-fingerprint="([0-9a-f]+)"', page).group(1)


def test_a_live_wait_answers_when_a_run_ends(app, client, served_app, alice, sites):
    task = post_task(served_app, alice, ["hospital-a"])
    run = sites["hospital-a"].claim()
    sites["hospital-a"].start(run)
    log_in(client, alice)
    before = page_fingerprint(text(client.get(f"/ui/tasks/{task['id']}")))
    assert client.get(f"/ui/live/tasks/{task['id']}?since=").json["fingerprint"] == before  # no since: at once
    # Neither looking again nor giving up ends this wait within the test: only the run's end, announced, can.
    app.config.update(DASHBOARD_RECHECK_SECONDS=600, DASHBOARD_WAIT_SECONDS=600)
    answered = {}
    waiting = threading.Thread(target=lambda: answered.update(
        client.get(f"/ui/live/tasks/{task['id']}?since={before}").json), daemon=True)
    waiting.start()
    sites["hospital-a"].finish(run)
    waiting.join(timeout=60)
    assert not waiting.is_alive(), "the live wait went on after the run ended"
    after = page_fingerprint(text(client.get(f"/ui/tasks/{task['id']}")))
    assert answered == {"fingerprint": after} and after != before


# --- how things look: pure decisions ---------------------------------------------------------------------------

@pytest.mark.parametrize("seconds_ago, words", [
    (None, "never"), (0, "just now"), (9, "just now"), (45, "45 s ago"), (60, "1 min ago"), (3599, "59 min ago"),
    (7200, "2 h ago"), (86400, "1 day ago"), (3 * 86400, "3 days ago"), (-300, "in 5 min"), (-5, "just now")])
def test_times_are_said_relative_to_now(seconds_ago, words):
    now = 1_000_000.0
    assert looks.relative_time(None if seconds_ago is None else now - seconds_ago, now) == words


def test_every_state_has_one_of_a_few_colours_whatever_the_database_holds():
    classes = {looks.state_class(state) for state in [*lifecycle.RunStatus, *lifecycle.TaskStatus]}
    assert classes <= {"state-ok", "state-bad", "state-busy", "state-waiting", "state-warn", "state-person",
                       "state-off"}
    assert looks.state_class('" onmouseover="x') == "state-unknown"


def test_progress_counts_ended_runs_and_colours_a_segment_per_site():
    runs = [{"site": "a", "status": "completed"}, {"site": "b", "status": "running"}, {"site": "c", "status": "failed"}]
    shown = looks.progress(runs)
    assert (shown["done"], shown["total"]) == (2, 3)
    assert [segment["class"] for segment in shown["segments"]] == ["state-ok", "state-busy", "state-bad"]


@pytest.mark.parametrize("count, words", [(0, "0 B"), (999, "999 B"), (3400, "3.4 kB"), (12_000_000, "12 MB"),
                                          (2_100_000_000, "2.1 GB")])
def test_sizes_are_said_in_round_units(count, words):
    assert looks.size(count) == words


def test_a_log_tail_keeps_the_last_lines_and_spells_out_control_characters():
    data = b"cut line\n" + b"".join(b"line %d\n" % i for i in range(100)) + b"\x1b[2J\x0cfeed\r\n"
    tail = looks.log_tail(data, cut_at_start=True, count=3)
    assert tail == "line 98\nline 99\n\\x1b[2J\\x0cfeed\\x0d"
    assert looks.log_tail(b"whole\nlog", cut_at_start=False) == "whole\nlog"
    assert looks.log_tail(b"\xff\xfe", cut_at_start=False) == "\ufffd\ufffd"


def test_a_session_waits_on_the_news_of_its_newest_active_task():
    tasks = [{"id": 3, "status": "completed"}, {"id": 5, "status": "active"}, {"id": 4, "status": "active"}]
    assert live.news_key(tasks) == 5 and live.news_key(tasks[:1]) is None


class _NewsDuringTheRead(wakeup.Announcements):
    """News for a task arrives (and the page changes) just as the wait reads the task's generation."""

    def __init__(self, page):
        super().__init__("test")
        self.page = page
        self.waits = []

    def generation(self, key):
        if self.page["fingerprint"] == "before":
            self.page["fingerprint"] = "after"
            self.announce([key])
        return super().generation(key)

    def wait_for_news(self, key, seen_generation, timeout):
        self.waits.append(seen_generation)
        return super().wait_for_news(key, seen_generation, 0)


def test_a_live_wait_sees_news_that_arrives_while_it_reads_the_generation():
    page = {"fingerprint": "before"}
    looks_made = []

    def look():
        looks_made.append(page["fingerprint"])
        return page["fingerprint"], 7

    announcements = _NewsDuringTheRead(page)
    shown = live.answer_when_changed(look, "before", announcements, recheck_seconds=600, wait_seconds=600)
    assert shown == "after" and looks_made == ["before", "after"]
    assert announcements.waits == [], "it waited for news that had already come (and would until the recheck)"


def test_csrf_tokens_compare_whole():
    visit = login.new_visit()
    assert login.csrf_matches(visit, visit.csrf)
    assert not login.csrf_matches(visit, visit.csrf[:-1]) and not login.csrf_matches(visit, None)
    assert not login.csrf_matches(None, visit.csrf)


def test_the_cookie_key_is_made_once(app):
    engine = app.extensions["pht"].engine
    assert login.cookie_secret(engine) == login.cookie_secret(engine) == app.config["DASHBOARD_COOKIE_SECRET"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.meta)).scalar() == 2
