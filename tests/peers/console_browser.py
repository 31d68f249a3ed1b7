"""Drives the Meshgate web console in a real browser (Debian's Chromium,
headless, through Playwright) for the end-to-end tests, and prints one JSON
object with what each page showed.

    console_browser.py BASE_URL TOKEN OUT_DIR ROUTE EXPLAIN_HOST [VIEWER_TOKEN [CONSUMER]]

Signs in with TOKEN; reads the topology graph (services and edges drawn),
the nodes table, the config browser of routes/ROUTE (its versions), rolls
ROUTE back to its oldest recorded version through the button, asks explain
about EXPLAIN_HOST, reads the propagation of the last write; saves a
screenshot of each page in OUT_DIR. With VIEWER_TOKEN, then signs in as a
viewer and tries the same rollback (the API refuses it); with CONSUMER,
reads that consumer's page in the config browser.
"""
import json
import re
import sys

from playwright.sync_api import expect, sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def sign_in(page, base, token):
    page.goto(base + "/console/")
    page.evaluate("sessionStorage.clear()")
    page.goto(base + "/console/#/topology")
    page.fill("#token", token)
    page.click("#login button")


def main():
    base, token, out, route, host = sys.argv[1:6]
    viewer = sys.argv[6] if len(sys.argv) > 6 else None
    consumer = sys.argv[7] if len(sys.argv) > 7 else None
    result = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("dialog", lambda d: d.accept())
        sign_in(page, base, token)

        page.wait_for_selector("svg#graph g.edge", timeout=20000)
        result["services"] = page.eval_on_selector_all("svg#graph g.service", "gs => gs.map(g => g.dataset.name)")
        result["edges"] = page.eval_on_selector_all(
            "svg#graph g.edge", "gs => gs.map(g => [g.dataset.caller, g.dataset.destination])")
        page.screenshot(path=f"{out}/topology.png", full_page=True)

        page.goto(base + "/console/#/nodes")
        page.wait_for_selector("#nodes tr.node", timeout=10000)
        result["nodes"] = page.eval_on_selector_all("#nodes tr.node", "rs => rs.map(r => r.dataset.id)")
        page.screenshot(path=f"{out}/nodes.png", full_page=True)

        page.goto(base + f"/console/#/config/routes/{route}")
        page.wait_for_selector("div.version", timeout=10000)
        result["versions"] = page.eval_on_selector_all("div.version", "ds => ds.map(d => Number(d.dataset.version))")
        result["version_before"] = int(page.inner_text("#current-version"))
        result["diff_has_changes"] = page.locator("pre.diff span.add").count() > 0
        page.screenshot(path=f"{out}/config.png", full_page=True)
        oldest = min(result["versions"])
        page.click(f"button.rollback[data-version='{oldest}']")
        page.wait_for_selector("#rolled-back", timeout=15000)
        result["rolled_back_to"] = oldest
        result["rollback_message"] = page.inner_text("#rolled-back")
        result["version_after"] = int(page.inner_text("#current-version"))
        page.screenshot(path=f"{out}/rolled-back.png", full_page=True)

        page.goto(base + "/console/#/explain")
        page.fill("#host", host)
        page.fill("#path", "/items")
        page.click("#explain button")
        # Locator waits run in Playwright's own world: the page's CSP (no
        # eval) stays in force for the page's scripts.
        expect(page.locator("#explanation")).not_to_be_empty(timeout=10000)
        result["explain"] = page.inner_text("#explanation")
        page.screenshot(path=f"{out}/explain.png", full_page=True)

        page.goto(base + "/console/#/propagation")
        page.wait_for_selector("#last-write", timeout=10000)
        expect(page.locator("#applied-count")).to_have_text(re.compile(r"^(\d+) of \1 gateway"), timeout=15000)
        result["last_write"] = page.inner_text("#last-write")
        result["applied"] = page.inner_text("#applied-count")
        page.screenshot(path=f"{out}/propagation.png", full_page=True)

        if viewer:
            sign_in(page, base, viewer)
            page.goto(base + f"/console/#/config/routes/{route}")
            page.wait_for_selector("button.rollback", timeout=10000)
            page.click("button.rollback >> nth=0")
            expect(page.locator("#error")).not_to_be_empty(timeout=10000)
            result["viewer_error"] = page.inner_text("#error")
        if consumer:
            page.goto(base + "/console/#/config/consumers")
            page.wait_for_selector(f"a[href='#/config/consumers/{consumer}']", timeout=10000)
            page.goto(base + f"/console/#/config/consumers/{consumer}")
            page.wait_for_selector("#spec", timeout=10000)
            result["consumer_spec"] = page.inner_text("#spec")
            page.screenshot(path=f"{out}/consumer.png", full_page=True)
        browser.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
