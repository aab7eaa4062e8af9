"""Debian's Chromium (/usr/bin/chromium, installed by scripts/setup.sh), driven by Playwright, kept on loopback.

Chromium phones home by default (component updates, safe browsing, DNS prefetch); here every name resolves to
nothing but 127.0.0.1, and every connection elsewhere goes to a proxy at 127.0.0.1:9, where nothing listens:
anything not on loopback fails at once, on this machine. Playwright never downloads a browser of its own.
"""

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-pings",
    "--disable-domain-reliability", "--dns-prefetch-disable", "--no-first-run", "--disable-default-apps",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
NOWHERE_PROXY = {"server": "http://127.0.0.1:9", "bypass": "127.0.0.1"}
VIEWPORT = {"width": 1280, "height": 800}  # a laptop's screen, and small screenshots


def chromium_missing():
    """Why the browser cannot start here, or None."""
    return None if CHROMIUM.exists() else f"{CHROMIUM} is missing: bash scripts/setup.sh installs Debian's chromium"


def launch_chromium(playwright):
    """Headless Chromium that can reach loopback only."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS,
                                      proxy=NOWHERE_PROXY)


def log_in(page, registry_url, token):
    """Log in through the dashboard's form, as a person does."""
    page.goto(f"{registry_url}/ui/login")
    page.fill("#token", token)
    page.click("form.login button[type=submit]")
