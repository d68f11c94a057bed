"""Drives the broker's operator console (/ui/) in headless Chromium with
Selenium, through one browser session, as an operator would.

usage: console_ui.py BASE_URL AGENT_URL GITLAB_URL SHOT_DIR PROJECTS
Secrets come from the environment: GITPROXY_API_KEY, GITLAB_TOKEN (the first
token), GITLAB_TOKEN2 (the rotated one). PROJECTS is how many projects the
catalogue must list.

The test around it owns the parts a browser cannot touch (the agent, the
sandbox GitLab, the broker process). Where the flow needs one of them this
script prints `NEED <what> [arg]` on stdout and reads one line from stdin when
it is done. Progress lines start with `STEP`; the last line is
`RESULT <json>`. Every step saves a screenshot in SHOT_DIR.

Any failed expectation raises: the script exits non-zero with the reason (and
a screenshot named fail-*.png).
"""

import json
import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

base, agent_url, gitlab_url, shots, projects = sys.argv[1:6]
projects = int(projects)
api_key = os.environ["GITPROXY_API_KEY"]
token1 = os.environ["GITLAB_TOKEN"]
token2 = os.environ["GITLAB_TOKEN2"]
WAIT = 20
step_no = 0


def say(*parts):
    print(*parts, flush=True)


def need(what, arg=""):
    say("NEED", what, arg)
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("the test went away while waiting for " + what)
    return line.strip()


def shot(name):
    global step_no
    step_no += 1
    path = os.path.join(shots, "%02d-%s.png" % (step_no, name))
    driver.save_screenshot(path)
    say("STEP", name, path)


def until(what, cond, timeout=WAIT):
    """Waits for cond(driver) to be truthy; fails naming what was awaited."""
    try:
        # The page re-renders tables as data arrives: an element read while it
        # is replaced is stale, and the next poll reads the new one.
        return WebDriverWait(
            driver, timeout, poll_frequency=0.1,
            ignored_exceptions=(StaleElementReferenceException, NoSuchElementException),
        ).until(lambda d: cond(d))
    except TimeoutException:
        raise AssertionError("waited %ss for: %s" % (timeout, what))


def find(css):
    return driver.find_element(By.CSS_SELECTOR, css)


def text(css):
    # Retried: the element may be replaced by a re-render between find and read.
    for _ in range(50):
        try:
            return find(css).text
        except StaleElementReferenceException:
            continue
    return find(css).text


def visible(css):
    els = driver.find_elements(By.CSS_SELECTOR, css)
    return bool(els) and els[0].is_displayed()


def fill(css, value):
    e = find(css)
    e.clear()
    e.send_keys(value)


def checks():
    """The Test Connection panel's checks: {name: (status, li element)}."""
    return {
        li.get_attribute("data-check"): (li.get_attribute("data-status"), li)
        for li in driver.find_elements(By.CSS_SELECTOR, "#test-checks li")
    }


def run_test(conn):
    find('#conn-table tr[data-id="%s"] .act-test' % conn).click()
    until("Test Connection of %s to finish" % conn,
          lambda d: find("#test-panel").get_attribute("data-state") in ("pass", "fail", "error"))
    return find("#test-panel").get_attribute("data-state")


def mr_count(state):
    return int(text('#mr-counts li[data-state="%s"] .count' % state))


def broker_only(urls):
    outside = [u for u in urls if not (u.startswith(base) or u.startswith("data:") or u == "about:blank")]
    assert not outside, "requests outside the broker: %s" % outside


opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
          "--window-size=1280,800", "--no-proxy-server", "--disable-extensions",
          "--disable-background-networking", "--disable-component-update", "--no-first-run",
          "--disable-sync", "--disable-default-apps"):
    opts.add_argument(a)
opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
result = {}
try:
    # 1. First load: the sign-in form, and nothing requested outside the broker.
    driver.get(base + "/ui/")
    until("the sign-in form", lambda d: visible("#signin-key"))
    perf = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    first_urls = [m["params"]["request"]["url"] for m in perf if m["method"] == "Network.requestWillBeSent"]
    assert first_urls, "the performance log saw no request"
    broker_only(first_urls)
    result["first_load_requests"] = first_urls
    shot("sign-in")

    # 2. A wrong key: a sign-in error, still on the form.
    fill("#signin-key", "testpat-wrong-api-key")
    find("#signin-key").send_keys(Keys.ENTER)
    until("the wrong-key error", lambda d: "refused" in text("#signin-error"))
    assert visible("#signin-key")
    result["wrong_key_error"] = text("#signin-error")
    shot("wrong-key")

    # 3. The right key: the connections page.
    fill("#signin-key", api_key)
    find("#signin-form button[type=submit]").click()
    until("the connections page", lambda d: visible("#conn-table"))
    driver.execute_script("window.__noReload = 'marker';")
    shot("signed-in")

    # 4. New agent-mode connection; a bad URL first: the API's error sits next to the field.
    find("#new-connection").click()
    fill("#f-id", "acme")
    fill("#f-url", "ftp://gitlab.example")
    fill("#f-token", token1)
    if not find("#f-proxy").is_selected():
        find("#f-proxy").click()
    assert "agent" in text("#f-proxy-help")
    find("#conn-save").click()
    until("the URL field error", lambda d: text("#f-url-error") != "")
    result["url_error"] = text("#f-url-error")
    assert "gitlab_url" in result["url_error"], result["url_error"]
    assert find("#f-url").get_attribute("aria-invalid") == "true"
    assert text("#conn-form-error") == "", "the error is on the field, not the form"
    shot("field-error")
    fill("#f-url", gitlab_url)
    fill("#f-token", token1)
    find("#conn-save").click()
    until("the acme row", lambda d: driver.find_elements(By.CSS_SELECTOR, '#conn-table tr[data-id="acme"]'))
    assert text('#conn-table tr[data-id="acme"] .mode') == "via agent"
    assert text('#conn-table tr[data-id="acme"] .status').upper() == "DISCONNECTED"
    assert "no accessKey yet" in text('#conn-table tr[data-id="acme"] .agents-cell')

    # 5. Agent install: saving an agent-mode connection without a key opens the panel.
    until("the agent install panel", lambda d: visible("#key-panel"))
    host = gitlab_url.split("//", 1)[1].split(":")[0].split("/")[0]
    assert find("#k-noproxy").get_attribute("value") == host, "noProxy prefilled with the GitLab host"
    fill("#k-broker", agent_url)
    find("#key-issue").click()
    until("the accessKey", lambda d: find("#key-value").get_attribute("value") != "")
    key = find("#key-value").get_attribute("value")
    helm = find("#helm-command").get_attribute("value")
    for part in ("helm upgrade --install", "gitproxy.accessKey=" + key, "gitproxy.brokerUrl=" + agent_url,
                 "proxy.noProxy={" + host + "}", "gitproxy.gitlabUrl=" + gitlab_url):
        assert part in helm, "%r not in the Helm command:\n%s" % (part, helm)
    fill("#k-proxy", "http://proxy.corp.example:3128")
    until("the command with the proxy", lambda d: "proxy.httpsProxy=http://proxy.corp.example:3128"
          in find("#helm-command").get_attribute("value"))
    result["helm_command"] = find("#helm-command").get_attribute("value").replace(key, "<key>")
    shot("access-key")
    find("#key-close").click()
    assert find("#key-value").get_attribute("value") == "", "the key is gone once the panel closes"

    # 6. The agent starts with that key: the table shows it without a reload.
    need("agent", key)
    until("acme connected with its agent",
          lambda d: text('#conn-table tr[data-id="acme"] .status').upper() == "CONNECTED"
          and driver.find_elements(By.CSS_SELECTOR, '#conn-table tr[data-id="acme"] li.agent[data-instance="agent-console"]'))
    assert driver.execute_script("return window.__noReload") == "marker", "the page was reloaded"
    result["agents_cell"] = text('#conn-table tr[data-id="acme"] .agents-cell')
    assert "in flight" in result["agents_cell"]
    shot("agent-connected")

    # 7. Test Connection: every check passes.
    assert run_test("acme") == "pass", text("#test-panel")
    cs = checks()
    assert sorted(cs) == sorted(["agent_connected", "gitlab_reachable", "tls_trusted", "token_valid",
                                 "token_scopes", "projects_found"]), cs.keys()
    # tls_trusted does not apply to the sandbox's plain http: skip, never fail.
    statuses = {k: s for k, (s, _) in cs.items()}
    assert statuses.pop("tls_trusted") in ("pass", "skip"), cs
    assert all(s == "pass" for s in statuses.values()), statuses
    assert "PASS" in text('#conn-table tr[data-id="acme"] .last-test').upper()
    shot("test-pass")

    # 8. Token revoked in GitLab: token_valid fails with its hint and a link to the guide.
    need("revoke")
    assert run_test("acme") == "fail"
    status, li = checks()["token_valid"]
    assert status == "fail", status
    hint = li.find_element(By.CSS_SELECTOR, ".hint").text
    assert hint.startswith("Hint:") and len(hint) > 20, hint
    result["token_valid_hint"] = hint
    assert "FAIL" in text('#conn-table tr[data-id="acme"] .last-test').upper()
    shot("test-token-revoked")
    li.find_element(By.CSS_SELECTOR, "a.doc-link").click()
    until("the troubleshooting section", lambda d: visible("#the-token-has-expired-or-was-revoked"))
    assert "revoked" in text("#the-token-has-expired-or-was-revoked")
    shot("troubleshooting")
    driver.back()
    until("the connections page again", lambda d: visible("#conn-table"))

    # 9. Update the token in the form: Test Connection passes again.
    find('#conn-table tr[data-id="acme"] .act-edit').click()
    until("the edit form", lambda d: visible("#conn-form-panel"))
    assert find("#f-id").get_attribute("readonly") is not None
    assert find("#f-token").get_attribute("value") == "", "the token is write-only"
    # Turning Route via Proxy off says what happens to the connected agents.
    find("#f-proxy").click()
    assert "disconnects the agents" in text("#f-proxy-help"), text("#f-proxy-help")
    find("#f-proxy").click()
    assert find("#f-proxy").is_selected()
    fill("#f-token", token2)
    find("#conn-save").click()
    until("the form to close", lambda d: not visible("#conn-form-panel"))
    assert run_test("acme") == "pass", text("#test-panel")
    shot("test-pass-after-rotation")

    # 10. Projects: the Developer+ catalogue, searchable and paged.
    find('#nav a[data-view="projects"]').click()
    until("the project list", lambda d: find("#view-projects").get_attribute("data-state") == "loaded")
    state_line = text("#proj-state")
    assert state_line.startswith("%d of %d projects" % (projects, projects)), state_line
    rows = driver.find_elements(By.CSS_SELECTOR, "#proj-table tbody tr")
    assert len(rows) == min(projects, 20), len(rows)
    shot("projects")
    find("#proj-next").click()
    until("page 2", lambda d: text("#proj-page").startswith("Page 2"))
    fill("#proj-search", "webapp")
    until("the search result", lambda d: len(driver.find_elements(By.CSS_SELECTOR, "#proj-table tbody tr")) == 1)
    assert text("#proj-table tbody tr").startswith("demo-group/webapp")
    shot("projects-search")

    # 11. Merge requests: one opened through the API, then merged in GitLab.
    find('#nav a[data-view="merge-requests"]').click()
    until("the MR list", lambda d: find("#view-merge-requests").get_attribute("data-state") == "loaded")
    before = {s: mr_count(s) for s in ("opened", "merged", "closed")}
    assert before == {"opened": 0, "merged": 0, "closed": 0}, before
    need("open-mr")
    find("#mr-refresh").click()
    until("the opened MR", lambda d: mr_count("opened") == 1 and driver.find_elements(By.CSS_SELECTOR, "#mr-table tbody tr"))
    row = text("#mr-table tbody tr")
    assert "demo-group/webapp" in row and "fix/lodash" in row and "OPENED" in row.upper(), row
    shot("mr-opened")
    need("merge-mr")
    find("#mr-refresh").click()
    until("the merged MR", lambda d: mr_count("merged") == 1 and mr_count("opened") == 0)
    assert "MERGED" in text("#mr-table tbody tr").upper()
    link = find("#mr-table tbody tr a").get_attribute("href")
    assert "/merge_requests/" in link, link
    result["mr_counts"] = {s: mr_count(s) for s in ("opened", "merged", "closed")}
    shot("mr-merged")

    # 12. Live events: what the stream delivered since sign-in.
    find('#nav a[data-view="events"]').click()
    until("an agent_connected event", lambda d: driver.find_elements(By.CSS_SELECTOR, '#ev-table tr[data-kind="agent_connected"]'))
    until("a request_finished event", lambda d: driver.find_elements(By.CSS_SELECTOR, '#ev-table tr[data-kind="request_finished"]'))
    result["events"] = len(driver.find_elements(By.CSS_SELECTOR, "#ev-table tbody tr"))
    shot("events")

    # 13. Keyboard: Tab from the top reaches the nav links and the buttons.
    find('#nav a[data-view="connections"]').click()
    until("the connections page", lambda d: visible("#conn-table"))
    driver.find_element(By.TAG_NAME, "body").click()
    seen = set()
    for _ in range(40):
        driver.switch_to.active_element.send_keys(Keys.TAB)
        a = driver.switch_to.active_element
        seen.add(a.get_attribute("id") or a.get_attribute("class") or a.text)
    for wanted in ("new-connection", "act-test", "act-edit"):
        assert wanted in seen, "%s not reachable with Tab: %s" % (wanted, seen)

    # Every request of the whole session stayed on the broker.
    perf = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    broker_only([m["params"]["request"]["url"] for m in perf if m["method"] == "Network.requestWillBeSent"])
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "Content Security Policy" in e["message"]]
    assert not severe, "CSP violations: %s" % severe

    # 14. A key the broker refuses later (rotated away): signed out with a clear message.
    driver.execute_script("sessionStorage.setItem('gitproxy.apiKey', 'testpat-stale-api-key')")
    driver.refresh()
    until("the signed-out message", lambda d: visible("#signin-key") and "refused" in text("#signin-error"))
    assert driver.execute_script("return sessionStorage.getItem('gitproxy.apiKey')") is None
    shot("stale-key")
    fill("#signin-key", api_key)
    find("#signin-form button[type=submit]").click()
    until("the acme row again", lambda d: visible("#conn-table") and
          driver.find_elements(By.CSS_SELECTOR, '#conn-table tr[data-id="acme"]'))

    # 15. The broker stops: a clear disconnected state, the page stays.
    need("stop-broker")
    until("the disconnected banner", lambda d: visible("#banner") and "Disconnected" in text("#banner"), timeout=10)
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-link") == "down"
    assert visible("#conn-table"), "the last data stays on the page"
    result["banner"] = text("#banner")
    shot("disconnected")
    say("RESULT", json.dumps(result))
except (AssertionError, WebDriverException) as e:
    try:
        driver.save_screenshot(os.path.join(shots, "fail-%02d.png" % (step_no + 1)))
    except WebDriverException:
        pass
    try:
        for entry in driver.get_log("browser"):
            print("browser:", entry["level"], entry["message"][:500], file=sys.stderr)
    except WebDriverException:
        pass
    say("FAILED", repr(e)[:2000])
    raise
finally:
    driver.quit()
