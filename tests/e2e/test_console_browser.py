"""The operator console in a real browser: Playwright drives Debian's chromium (launched by
path, nothing downloaded) against a real ``loyalty serve`` on SQLite.

An operator signs in from the keyboard, watches the dashboard refresh itself, looks a
member up, adjusts and spends and sees the balance change in place, edits the rules with
an error and then a valid change, asks for a member to be forgotten and sees the
receipt, creates a key, revokes their own and is refused. Every page is checked for
accessible names, contrast and CSP violations, and photographed into ``artifacts/``
(not committed). The server's log is searched for the user ids and keys afterwards.

Without chromium the tests skip, except under ``CI`` where they fail (``.ci/run``
installs it).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.e2e.live import cli, create_key, serve_logged

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("LOYALTY_ARTIFACTS", Path(__file__).parents[2] / "artifacts"))

# Every visible form control has an accessible name; every text has a contrast of at
# least 4.5:1 against its effective background (WCAG AA); nothing focusable is removed
# from the tab order. Returns the offenders.
A11Y_CHECK = """
() => {
  const problems = [];
  const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  for (const el of document.querySelectorAll('input, select, textarea, button, progress')) {
    if (el.type === 'hidden' || !visible(el)) continue;
    const named = (el.labels && el.labels.length) || el.getAttribute('aria-label')
      || el.getAttribute('aria-labelledby') || (el.tagName === 'BUTTON' && el.textContent.trim());
    if (!named) problems.push('no accessible name: ' + el.outerHTML.slice(0, 80));
    if (el.tabIndex < 0 && !el.disabled && el.tagName !== 'PROGRESS')
      problems.push('not keyboard reachable: ' + el.outerHTML.slice(0, 80));
  }
  const rgb = (s) => (s.match(/[0-9.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const c = [r, g, b].map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0.5)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!node.textContent.trim() || !visible(el)) continue;
    if (el.closest('.visually-hidden, .skip')) continue;
    const fg = rgb(getComputedStyle(el).color).slice(0, 3);
    const [a, b] = [lum(fg), lum(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5)
      problems.push('contrast ' + ratio.toFixed(2) + ': ' + node.textContent.trim().slice(0, 40));
  }
  return problems;
}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is required in CI (.ci/run installs chromium)")
        pytest.skip(f"{CHROMIUM} not installed")

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


class Visit:
    """A page plus what the checks collect: CSP and console errors, foreign requests."""

    def __init__(self, browser: Any, base: str, width: int = 1200, height: int = 900) -> None:
        self.base = base
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on(
            "request",
            lambda r: None if r.url.startswith(base) else self.foreign.append(r.url),
        )

    def check(self, name: str) -> None:
        """Accessibility of the page as it is, then a screenshot."""
        # a click on a link returns once the next page's navigation has committed, before
        # its body is parsed: "createTreeWalker ... parameter 1 is not of type 'Node'"
        # (document.body still null) in a full run here
        self.page.wait_for_load_state("load")
        problems = self.page.evaluate(A11Y_CHECK)
        assert problems == [], (name, problems)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()
        csp = [e for e in self.errors if "Content Security Policy" in e or "Refused to" in e]
        assert csp == [], csp
        assert self.foreign == [], self.foreign


def settled(page: Any) -> None:
    """Wait until htmx has finished a swap: its new forms answer by htmx (they are wired
    when the swap settles, ``defaultSettleDelay`` later). Clicking a just-swapped form's
    button before that submits it natively: a full page load (failed once under CI)."""
    page.wait_for_function(
        "() => !document.querySelector("
        "'.htmx-added, .htmx-settling, .htmx-swapping, .htmx-request')"
    )


def sign_in_by_keyboard(page: Any, key: str) -> None:
    for _ in range(20):  # Tab from the top of the page to the key field
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == "key":
            break
    else:
        raise AssertionError("the key field is not reachable with Tab")
    page.keyboard.type(key)
    with page.expect_navigation():
        page.keyboard.press("Enter")


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], Any]]:
    url = f"sqlite:///{tmp_path / 'console.db'}"
    cli(url, "migrate")  # a one-shot command does not create a database
    keys = {
        "operator": create_key(url, "operator", "ops-ann"),
        "shop": create_key(url, "shop", "till"),
        "ingest": create_key(url, "ingest", "gamesite"),
    }
    with serve_logged(url, LOYALTY_FORGET_SETTLE_SECONDS="0", LOYALTY_LOG_FORMAT="json") as (
        base,
        output,
    ):
        yield base, keys, output


def test_an_operator_runs_the_loyalty_programme_from_the_console(
    browser: Any, live: tuple[str, dict[str, str], Any]
) -> None:
    base, keys, output = live
    member = f"member-{uuid.uuid4().hex[:12]}"
    forgotten = f"forget-{uuid.uuid4().hex[:12]}"
    player = f"player-{uuid.uuid4().hex[:12]}"
    visit = Visit(browser, base)
    page = visit.page

    # behind a TLS proxy (X-Forwarded-Proto from 127.0.0.1, uvicorn's forwarded-headers
    # setting) the cookies are Secure; over plain HTTP they cannot be
    for proto, secure in (("https", True), (None, False)):
        headers = {"X-Forwarded-Proto": proto} if proto else {}
        cookie = httpx.get(base + "/console/sign-in", headers=headers).headers["set-cookie"]
        assert ("; secure" in cookie.lower()) is secure, cookie
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()

    # a shop or ingest key cannot sign in
    page.goto(base + "/console/")
    assert page.url == base + "/console/sign-in"
    visit.check("sign-in")
    for role in ("shop", "ingest"):
        page.fill("#key", keys[role])
        page.click("button[type=submit]")
        assert (
            page.locator("#sign-in-error").inner_text() == "only operator keys may use the console"
        )
    page.goto(base + "/console/sign-in")

    # the operator signs in from the keyboard; the dashboard refreshes by itself
    sign_in_by_keyboard(page, keys["operator"])
    assert page.url == base + "/console/", page.content()
    # the browser holds a session id only: not the key, in no cookie or storage
    held = page.evaluate(
        "() => document.cookie + JSON.stringify(localStorage) + JSON.stringify(sessionStorage)"
    )
    cookies = visit.context.cookies()
    assert [c["name"] for c in cookies] == ["loyalty_console"] and cookies[0]["httpOnly"]
    for secret in (keys["operator"], keys["operator"].split("_", 2)[2]):
        assert secret not in held and all(secret not in c["value"] for c in cookies)
    assert page.locator("h1").inner_text() == "Dashboard"
    page.evaluate("window.stillTheSamePage = true")
    first = page.locator("#live time").last.inner_text()
    page.wait_for_function(
        "t => [...document.querySelectorAll('#live time')].pop()?.textContent !== t",
        arg=first,
        timeout=15_000,
    )
    # events arrive: the ingest rate and the waiting events show it, still no reload
    now = datetime.now(UTC).isoformat()
    events = [
        {"event_id": f"e{i}", "user_id": player, "type": "logged_on", "occurred_at": now}
        for i in range(50)
    ]
    ingest = {"Authorization": f"Bearer {keys['ingest']}"}
    answer = httpx.post(base + "/v1/ingress/batches", json={"events": events}, headers=ingest)
    assert answer.status_code == 202
    page.wait_for_function(
        "() => parseFloat(document.querySelector('#ingest-rate')?.textContent) > 0",
        timeout=15_000,
    )
    assert page.evaluate("window.stillTheSamePage") is True  # refreshed without reloading
    visit.check("dashboard")

    # look a member up; adjust (a reason is required), spend, see the balance change
    page.click("nav >> text=Members")
    page.fill("#search-user", member)
    page.press("#search-user", "Enter")
    expect(page.locator("#member-missing")).to_be_visible()
    page.evaluate("window.stillTheSamePage = true")
    page.fill("#adjust-currency", "100")
    page.fill("#adjust-points", "10")
    page.fill("#adjust-reason", "welcome bonus")
    page.click("#member form[aria-labelledby=adjust-h] button")
    page.wait_for_selector("#balance")
    settled(page)
    assert page.locator("#balance").inner_text() == "100"
    page.fill("#spend-order", "order-1")
    page.fill("#spend-amount", "30")
    page.click("#member form[aria-labelledby=spend-h] button")
    page.wait_for_function("() => document.querySelector('#balance')?.textContent === '70'")
    settled(page)
    assert page.locator("#result-message").inner_text() == "spent 30 on order order-1"
    page.fill("#spend-order", "order-2")
    page.fill("#spend-amount", "1000")
    page.click("#member form[aria-labelledby=spend-h] button")
    page.wait_for_selector("#result-message.error")
    assert "insufficient funds" in page.locator("#result-message").inner_text()
    assert page.locator("#balance").inner_text() == "70"  # the error, in place
    assert page.evaluate("window.stillTheSamePage") is True  # no reload for any of it
    deadline = time.monotonic() + 30  # the statement follows the account (projection)
    while True:
        page.goto(f"{base}/console/members?user_id={member}")
        kinds = page.locator("#history tbody tr td:nth-child(2)").all_inner_texts()
        if {"adjustment", "spend"} <= set(kinds) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert {"adjustment", "spend"} <= set(kinds)
    visit.check("member")

    # rules: an error shown at the field, then a valid change saved as a new version
    page.click("nav >> text=Rules")
    original = page.locator("#rules-text").input_value()
    page.fill(
        "#rules-text",
        original.replace('"ranks": [', '"ranks": [{"name": "", "min_rank_points": -5},', 1),
    )
    page.click("#save-button")
    errors = page.locator("#rules-errors")
    assert (
        "ranks[0].name" in errors.inner_text() and "ranks[0].min_rank_points" in errors.inner_text()
    )
    assert page.get_attribute("#rules-text", "aria-invalid") == "true"
    assert page.get_attribute("#rules-text", "aria-describedby") == "rules-errors"
    page.click("#rules-errors button[data-line]")  # to the error's line in the editor
    selected = page.evaluate(
        "() => { const t = document.getElementById('rules-text');"
        " return t.value.slice(t.selectionStart, t.selectionEnd); }"
    )
    assert '"ranks": [' in selected
    assert page.evaluate("() => document.activeElement.id") == "rules-text"
    visit.check("rules-error")
    # a dry run of a candidate: the difference shown in place, nothing saved
    candidate = json.loads(original)
    for rule in candidate["rules"]:
        if rule["event_type"] == "logged_on":
            rule["currency"] = 3  # the player's one counted logon: 1 -> 3
    page.fill("#rules-text", json.dumps(candidate, indent=2))
    page.evaluate("window.stillTheSamePage = true")
    page.click("#dry-run-button")
    page.wait_for_selector("#dry-run-summary")
    settled(page)
    assert "Nothing was saved." in page.locator("#dry-run-summary").inner_text()
    row = page.locator("#dry-run-totals tbody tr").first.inner_text().split()
    assert row == ["currency", "1", "3", "2"], row
    assert page.locator("#rules-version").inner_text() == "1"
    assert page.evaluate("window.stillTheSamePage") is True
    visit.check("rules-dry-run")
    page.fill("#rules-text", re.sub(r'"bronze"', '"copper"', original, count=1))
    page.click("#save-button")
    # an irreversible action shows what it will do first (#27)
    assert "the rank ladder changes" in page.locator("#confirm-effects").inner_text()
    visit.check("rules-confirm")
    page.click("#confirm-button")
    assert page.locator("#rules-saved").inner_text() == "Saved as version 2."
    assert "copper" in page.locator("#rules-text").input_value()
    expect(page.locator("#versions tbody tr")).to_have_count(2)
    visit.check("rules")

    # forget-me: request, follow the progress, read the receipt (no user id)
    page.goto(f"{base}/console/members?user_id={forgotten}")
    page.fill("#adjust-currency", "5")
    page.fill("#adjust-reason", "to be forgotten")
    page.click("#member form[aria-labelledby=adjust-h] button")
    page.wait_for_selector("#balance")
    settled(page)
    page.click("nav >> text=Forget-me")
    visit.check("forget")
    page.fill("#forget-user", forgotten)
    page.click("main form button[type=submit]")
    assert "5 currency" in page.locator("#confirm-effects").inner_text()
    visit.check("forget-confirm")
    page.click("#confirm-button")
    assert "/console/forget/" in page.url
    page.wait_for_function(
        "() => document.querySelector('#forget-status')?.textContent.startsWith('completed')",
        timeout=60_000,
    )
    assert forgotten not in page.content()
    expect(page.locator("#erased")).to_be_visible()
    visit.check("forget-receipt")
    page.goto(f"{base}/console/members?user_id={forgotten}")
    expect(page.locator("#member-missing")).to_be_visible()

    # reports: the daily charts from the rollups over a chosen range, and its export
    page.click("nav >> text=Reports")
    today = datetime.now(UTC).date()
    page.fill("#report-from", (today - timedelta(days=2)).isoformat())
    page.fill("#report-to", today.isoformat())
    page.click("main form.inline button[type=submit]")
    expect(page.locator("figure[data-field=events] svg")).to_have_count(1)
    deadline = time.monotonic() + 30  # the 50 events above, once the pipeline weighed them
    while "50" not in page.locator("#report-days tbody tr").last.inner_text():
        assert time.monotonic() < deadline, page.locator("#report-days").inner_text()
        time.sleep(0.5)
        page.reload()
    visit.check("reports")
    with page.expect_download() as download:
        page.click("#export")
    exported = Path(download.value.path()).read_text().splitlines()
    assert exported[0].startswith("day,events,") and len(exported) == 4
    assert exported[-1].startswith(f"{today.isoformat()},50,")

    # the player's award (a new member's first award is recorded at once), explained
    deadline = time.monotonic() + 30
    while True:
        page.goto(f"{base}/console/members?user_id={player}")
        why_buttons = page.locator("#history button[aria-controls=explanation]")
        if why_buttons.count() or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    why_buttons.first.click()
    page.wait_for_selector("#explanation .explanation")
    why = page.locator("#explanation").inner_text()
    assert "recorded" in why and "logged_on" in why and "50 events" in why, why
    visit.check("explanation")

    # webhooks page, keys: a new key is shown once; revoking one's own key signs out
    page.click("nav >> text=Webhooks")
    visit.check("webhooks")
    page.click("nav >> text=Keys")
    page.select_option("#key-role", "shop")
    page.fill("#key-name", "till-2")
    page.click("main form.inline button")
    new_key = page.locator("#new-key").input_value()
    assert new_key.startswith("lk_")
    visit.check("keys")
    operator_id = keys["operator"].split("_")[1]
    page.click(f"button[aria-label^='Revoke key {operator_id}']")
    assert "the key you signed in with" in page.locator("#confirm-effects").inner_text()
    visit.check("revoke-confirm")
    page.click("#confirm-button")
    assert page.url == base + "/console/sign-in"
    page.goto(base + "/console/keys")
    assert page.url == base + "/console/sign-in"
    page.fill("#key", keys["operator"])
    page.click("button[type=submit]")
    assert page.locator("#sign-in-error").inner_text() == "this key is unknown or revoked"
    visit.close()

    # the key never reached the browser's storage, and the server logged no user id or key
    log = output()
    assert "Uvicorn running" in log
    for secret in [member, forgotten, player, *keys.values(), new_key]:
        assert secret not in log
        assert secret.split("_", 2)[-1] not in log


def svg_texts(page: Any, field: str) -> list[str]:
    texts: list[str] = page.locator(f"figure[data-field={field}] svg text").all_text_contents()
    return texts


def test_charts_that_read_finding_members_and_reviewing_rule_changes(
    browser: Any, live: tuple[str, dict[str, str], Any]
) -> None:
    """Issue 33 (2, 3, 4, 6) at 1280x800: the report's charts carry dates and values as
    text and start where the data starts; members are found by id prefix and listed
    recent and top, a page at a time; a rules change shows its diff before the save and
    in the history with its author; a new key's secret is copied by a button."""
    base, keys, _output = live
    run = uuid.uuid4().hex[:6]
    players = [f"player-{run}-{i}" for i in range(3)]
    now = datetime.now(UTC)
    events = [
        {"event_id": f"r{i}", "user_id": p, "type": "played_game", "occurred_at": now.isoformat()}
        for i, p in enumerate(players * 4)
    ]
    ingest = {"Authorization": f"Bearer {keys['ingest']}"}
    answer = httpx.post(base + "/v1/ingress/batches", json={"events": events}, headers=ingest)
    assert answer.status_code == 202
    visit = Visit(browser, base, 1280, 800)
    visit.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = visit.page
    page.goto(base + "/console/sign-in")
    page.fill("#key", keys["operator"])
    with page.expect_navigation():
        page.click("button[type=submit]")

    # members: the recently changed list (the default), once the awards are projected
    deadline = time.monotonic() + 60
    while True:
        page.goto(base + "/console/members")
        shown = page.locator("#member-list tbody tr td:first-child").all_inner_texts()
        if set(players) <= set(shown) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(players) <= set(shown), shown
    visit.check("members-recent")
    shop = {"Authorization": f"Bearer {keys['shop']}"}
    spend = {"order_id": "o-1", "amount": 3}
    spent = httpx.post(f"{base}/v1/members/{players[0]}/spend", json=spend, headers=shop)
    assert spent.status_code == 200, spent.text
    page.fill("#find-prefix", f"player-{run}-")
    page.select_option("#find-list", "top")
    page.click("form[aria-label='Find members'] button")
    assert page.locator("#list-h").inner_text().startswith("Top by rank points")
    found = page.locator("#member-list tbody tr td:first-child").all_inner_texts()
    assert sorted(found) == sorted(players)
    visit.check("members-search")
    page.fill("#find-prefix", "nobody-here-")
    page.click("form[aria-label='Find members'] button")
    assert "nobody-here-" in page.locator("#member-list-empty").inner_text()
    visit.check("members-empty")

    # reports: a chart per figure, dates and values as text, the days before the data
    # named as no data (the range opens 30 days back)
    deadline = time.monotonic() + 60
    while True:
        page.goto(base + "/console/reports")
        spent_texts = svg_texts(page, "currency_spent")
        if "3" in spent_texts or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    today = now.date()
    assert "3" in spent_texts, spent_texts  # the spend, labelled on its bar
    assert today.strftime("%b %d") in spent_texts and "currency" in spent_texts
    events_texts = svg_texts(page, "events")
    assert today.strftime("%b %d") in events_texts and "events" in events_texts
    assert any(t.startswith("UTC day, ") for t in events_texts), events_texts
    assert page.locator("#no-data").inner_text().startswith("No data from ")
    for field in ("events", "currency_credited", "currency_spent", "outstanding_currency"):
        expect(page.locator(f"figure[data-field={field}] figcaption")).to_be_visible()
    visit.check("reports-charts")

    # rules: the diff before the save, then who, when and what in the history
    page.click("nav >> text=Rules")
    document = json.loads(page.locator("#rules-text").input_value())
    for rule in document["rules"]:
        if rule["event_type"] == "played_game":
            rule["daily_cap"] = 60
    page.fill("#rules-text", json.dumps(document, indent=2))
    page.click("#save-button")
    diff = page.locator("#confirm-diff tbody tr").first.inner_text().split()
    assert diff == ["rules[played_game].daily_cap", "50", "60"], diff
    visit.check("rules-diff")
    page.click("#confirm-button")
    assert page.locator("#rules-saved").inner_text() == "Saved as version 2."
    newest = page.locator("#versions tbody tr").first
    assert newest.locator("td.author").inner_text() == "ops-ann"
    assert "rules[played_game].daily_cap: 50 -> 60" in newest.locator("td.changes").inner_text()
    page.locator("#versions-h").scroll_into_view_if_needed()
    visit.check("rules-history")
    page.click("#versions >> text=version 2")
    assert "ops-ann" in page.locator("#version-stored").inner_text()
    assert "rules[played_game].daily_cap" in page.locator("#version-changes").inner_text()
    assert '"currency_expiry": null' in page.locator("pre.code").inner_text()
    visit.check("rules-version")

    # keys: a new secret, copied by its button
    page.click("nav >> text=Keys")
    page.fill("#key-name", f"till-{run}")
    page.click("main form.inline button")
    secret = page.locator("#new-key").input_value()
    page.click("#copy-key")
    page.wait_for_function(
        "() => document.querySelector('#copy-status')?.textContent.startsWith('Copied')"
    )
    assert page.evaluate("navigator.clipboard.readText()") == secret
    visit.check("keys-copy")
    visit.close()
