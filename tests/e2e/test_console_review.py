"""Issue 33 (items 2, 3, 4, 6) over HTTP: charts that read (server-side SVG with axes,
dates and values; days before the data marked, not drawn as zeros), finding a member
(id prefix, recent and top members, keyset paging), reviewing rule changes (a diff
before save, and who, when and what in the history), the copy button of a new key."""

from __future__ import annotations

import html as html_module
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore
from loyalty.application.access import Role
from tests.e2e.live import cli
from tests.e2e.test_console import act, sign_in


@pytest.fixture
def console(client: TestClient, db: Database) -> tuple[TestClient, str]:
    """A console signed in with the operator key ``ops-alice``."""
    return client, sign_in(client, KeyStore(db).create(Role.OPERATOR, "ops-alice"))


def rules_text(page: str) -> str:
    found = re.search(r'<textarea id="rules-text"[^>]*>([^<]*)</textarea>', page, re.S)
    assert found, page
    return html_module.unescape(found.group(1))


def test_a_rules_change_shows_its_diff_before_save_and_in_the_history_with_its_author(
    console: tuple[TestClient, str],
) -> None:
    client, csrf = console
    current = json.loads(rules_text(client.get("/console/rules").text))
    for rule in current["rules"]:
        if rule["event_type"] == "logged_on":
            rule["currency"] = 3
    current["ranks"][0]["privileges"].append("birthday_gift")
    text = json.dumps(current, indent=2)
    # before the save: the confirmation lists each changed field with before and after
    confirm = client.post("/console/rules", data={"csrf": csrf, "rules": text})
    assert confirm.status_code == 200
    diff = re.search(r'<table class="diff" id="confirm-diff">(.*?)</table>', confirm.text, re.S)
    assert diff, confirm.text
    rows = re.findall(r"<tr class=\"(\w+)\">(.*?)</tr>", diff.group(1), re.S)
    cells = [
        (kind, [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)])
        for kind, row in rows
    ]
    assert ("changed", ["rules[logged_on].currency", "1", "3"]) in cells, cells
    privileges = [c for k, c in cells if c[0] == "ranks[bronze].privileges"]
    assert privileges and "birthday_gift" in html_module.unescape(privileges[0][2])
    assert len(cells) == 2, cells  # nothing else differs
    assert 'id="rules-version">1<' in client.get("/console/rules").text  # nothing saved yet
    saved = client.post("/console/rules", data={"csrf": csrf, "rules": text, "confirm": "yes"})
    assert "Saved as version 2." in saved.text
    # the history: who (the signed-in key's name), when, what changed
    rows = re.findall(
        r"<tr>\s*<td><a href=\"/console/rules/versions/(\d+)\">(.*?)</tr>", saved.text, re.S
    )
    assert [v for v, _ in rows] == ["2", "1"]
    newest = rows[0][1]
    assert '<td class="author">ops-alice</td>' in newest
    assert "rules[logged_on].currency: 1 -&gt; 3" in newest
    assert "the first version" in rows[1][1] and '<td class="author">built in</td>' in rows[1][1]
    version = client.get("/console/rules/versions/2").text
    assert 'by <strong class="author">ops-alice</strong>' in version
    assert "Changes from version 1" in version and "rules[logged_on].currency" in version
    # every field of the document, the unset optional parts as null
    assert "&#34;currency_expiry&#34;: null" in version or '"currency_expiry": null' in version


def test_the_rules_history_pages_by_version(console: tuple[TestClient, str]) -> None:
    client, csrf = console
    text = rules_text(client.get("/console/rules").text)
    for n in range(12):
        changed = json.loads(text)
        changed["rules"][0]["daily_cap"] = n + 1
        body = {"csrf": csrf, "rules": json.dumps(changed), "confirm": "yes"}
        assert client.post("/console/rules", data=body).status_code == 200
    first = client.get("/console/rules").text
    shown = re.findall(r'<a href="/console/rules/versions/(\d+)">', first)
    assert shown == [str(v) for v in range(13, 3, -1)]
    older = re.search(r'href="/console/rules\?before=(\d+)#versions-h" id="versions-older"', first)
    assert older and older.group(1) == "4"
    second = client.get("/console/rules", params={"before": "4"}).text
    assert re.findall(r'<a href="/console/rules/versions/(\d+)">', second) == ["3", "2", "1"]
    assert 'id="versions-older"' not in second
    # version 4's change is computed against version 3, off the page; version 2 kept
    # the default's cap (1): no change
    assert "rules[logged_on].daily_cap: 2 -&gt; 3" in first
    assert "rules[logged_on].daily_cap: 1 -&gt; 2" in second
    assert "no change from version 1" in second


def test_rules_show_prints_every_field_and_rules_history_who_when_what(tmp_path: Path) -> None:
    """``loyalty rules show`` prints the optional parts as null (and loads back as it
    is); ``loyalty rules history`` lists each version with its author and its changes,
    whether stored by the CLI or through the console by a key."""
    url = f"sqlite:///{tmp_path / 'rules.db'}"
    cli(url, "migrate")
    shown = cli(url, "rules", "show")
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["currency_expiry"] is None and document["rank_qualification"] is None
    assert "version 1 (current)" in shown.stderr and "by built in" in shown.stderr
    for rule in document["rules"]:
        if rule["event_type"] == "played_game":
            rule["daily_cap"] = None
    document["rank_qualification"] = {"period": "calendar_year", "grace_days": 30}
    (tmp_path / "rules.json").write_text(json.dumps(document))
    loaded = cli(url, "rules", "load", str(tmp_path / "rules.json"))
    assert loaded.returncode == 0 and "version 2" in loaded.stdout, loaded.stderr
    # a version stored by a key (as the console and PUT /v1/rules store them)
    from loyalty.adapters.db import Database
    from loyalty.adapters.rules_store import RulesStore
    from loyalty.config import Settings

    db = Database(Settings(database_url=url))
    try:
        document["rules"] = [r for r in document["rules"] if r["event_type"] != "logged_on"]
        RulesStore(db).put({k: v for k, v in document.items() if k != "version"}, author="ops-bo")
    finally:
        db.dispose()
    listed = cli(url, "rules", "history")
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert re.search(r"^version 3  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  by ops-bo$", out, re.M), out
    assert re.search(r"^version 2  .*  by cli:\S+$", out, re.M), out
    assert "    rules[logged_on]: removed (was " in out
    assert "    rules[played_game].daily_cap: 50 -> null" in out
    assert '    rank_qualification: added {"grace_days": 30, "period": "calendar_year"}' in out
    assert "version 1  " in out and "nothing to compare with" in out
    as_json = json.loads(cli(url, "rules", "history", "--json", "--limit", "1").stdout)
    assert [v["version"] for v in as_json["versions"]] == [3]
    assert as_json["versions"][0]["author"] == "ops-bo"
    assert as_json["versions"][0]["changes"][0]["path"] == "rules[logged_on]"
    paged = cli(url, "rules", "history", "--limit", "1")
    assert "loyalty rules history --before 3" in paged.stdout
    old = cli(url, "rules", "show", "--version", "2")
    assert json.loads(old.stdout)["rank_qualification"]["grace_days"] == 30
    assert "version 2, stored" in old.stderr and "by cli:" in old.stderr
    assert cli(url, "rules", "show", "--version", "9").returncode == 2


def listed(html: str) -> list[str]:
    table = re.search(r'<table id="member-list">(.*?)</table>', html, re.S)
    if table is None:
        return []
    found = re.findall(r'<a href="/console/members\?user_id=[^"]*">([^<]*)</a>', table.group(1))
    return [html_module.unescape(u) for u in found]


def next_page(html: str) -> str | None:
    found = re.search(r'<a href="(/console/members\?[^"]*)" id="next-page"', html)
    return html_module.unescape(found.group(1)) if found else None


def test_members_are_found_by_id_prefix_and_listed_recent_and_top_a_page_at_a_time(
    console: tuple[TestClient, str], db: Database
) -> None:
    from loyalty.bootstrap import build_projection

    client, csrf = console
    container = client.app.state.container  # type: ignore[attr-defined]
    empty = client.get("/console/members").text
    assert "No members yet" in empty and listed(empty) == []
    names = [f"alice-{i:02d}" for i in range(12)] + [f"bob-{i:02d}" for i in range(13)]
    names.append("ALICE-upper")
    for i, name in enumerate(names):
        status, _ = act(
            client,
            csrf,
            "adjust",
            user_id=name,
            adjustment_id=f"a{i}",
            currency=str(i + 1),
            rank_points=str((i * 7) % 26),
            reason="seed",
        )
        assert status == 200
    build_projection(db, container.accounts.app).catch_up()

    # a prefix: exact (case matters, as user ids do), by id, one page
    alice = client.get("/console/members", params={"q": "alice"}).text
    assert listed(alice) == [f"alice-{i:02d}" for i in range(12)]
    assert next_page(alice) is None
    assert listed(client.get("/console/members", params={"q": "ALICE"}).text) == ["ALICE-upper"]
    none = client.get("/console/members", params={"q": "carol"}).text
    assert listed(none) == [] and 'id="member-list-empty"' in none
    assert "user id starts with <code>carol</code>" in none

    # top by rank points, two pages by keyset, every member once, in order
    points = {name: (i * 7) % 26 for i, name in enumerate(names)}
    expected = sorted(names, key=lambda n: (-points[n], n))
    first = client.get("/console/members", params={"list": "top"}).text
    assert listed(first) == expected[:20]
    link = next_page(first)
    assert link and "after=" in link and "list=top" in link
    second = client.get(link).text
    assert listed(second) == expected[20:] and next_page(second) is None
    assert 'id="first-page"' in second

    # recently changed first (the default list)
    recent = listed(client.get("/console/members").text)
    assert recent[0] == "ALICE-upper" and recent[:3] == ["ALICE-upper", "bob-12", "bob-11"]

    # keyset, not OFFSET: a member added before the page boundary does not shift the
    # next page (an offset would show the last member of page one again)
    by_id = client.get("/console/members", params={"list": "id"}).text
    page_one = listed(by_id)
    assert page_one == sorted(names)[:20]
    status, _ = act(
        client,
        csrf,
        "adjust",
        user_id="alice-00a",
        adjustment_id="late",
        currency="1",
        rank_points="0",
        reason="late",
    )
    build_projection(db, container.accounts.app).catch_up()
    link = next_page(by_id)
    assert link
    assert listed(client.get(link).text) == sorted(names)[20:]
    # a broken cursor is a 422 naming it
    broken = client.get("/console/members", params={"list": "top", "after": "!!"})
    assert broken.status_code == 422 and "after" in broken.text


def test_rules_stored_through_the_api_name_their_key_as_author(
    client: TestClient, db: Database
) -> None:
    """``PUT /v1/rules`` records the name of the key that stored the version, as the
    console does (the history's "who")."""
    from loyalty.adapters.rules_store import RulesStore

    secret = KeyStore(db).create(Role.OPERATOR, "ops-carol")
    headers = {"Authorization": f"Bearer {secret}"}
    current = client.get("/v1/rules", headers=headers).json()
    current.pop("version", None)
    current["rules"][0]["currency"] = current["rules"][0]["currency"] + 1
    stored = client.put("/v1/rules", json=current, headers=headers)
    assert stored.status_code == 200, stored.text
    newest = RulesStore(db).versions(1, None)[0]
    assert newest.author == "ops-carol"
