"""Helpers for browser tests of the Prefect UI: a real Prefect server and a headless Chromium page.

    base, proc = start_prefect_server(tmp_path / "prefect-home")      # stop: tests.conftest.stop_group(proc)
    with browser_page() as page:
        found = open_run_artifacts(page, base, flow_run_id, screenshot_dir=tmp_path)
        screenshot(page, tmp_path / "page.png")

What the Prefect 3 UI (the default "V1" UI, served by `prefect server start`) shows, as found here
with Prefect 3.9:

- A flow run's page is `/runs/flow-run/<flow_run_id>`. Under its graph sits a tab bar
  (`ul[role=tablist] li.p-tab`: Logs, Task Runs, Subflow Runs, Artifacts, Details, Parameters,
  Job Variables). Clicking "Artifacts" (`li.p-tab#artifacts`) sets `?tab=Artifacts` and shows the
  panel `section#artifacts-content div.flow-run-artifacts`: a "Flow run" and a "Task runs"
  section, each a grid (or, with the view toggle, a list) of artifact *cards* in a virtual
  scroller, or "None" (`.flow-run-artifacts__none`). A card is a link
  `a[href="/artifacts/artifact/<artifact_id>"]` showing only the artifact's type
  (`.artifact-card__subheader`: progress / markdown / table / ...), its key
  (`.artifact-card__title`), its creation time and its description (`.artifact-card__description`).
  The run page does NOT render any artifact's content inline: no progress percentage, no table,
  no markdown; the same holds for the V2 UI (`/v2/runs/flow-run/<id>?tab=Artifacts`). (The run
  graph above the tabs marks each artifact by key on the timeline, nothing more.) Loading the URL
  with `?tab=Artifacts` directly, or coming back to it with the browser's Back, does not select the
  tab: it has to be clicked.
- Clicking a card opens the artifact's page `/artifacts/artifact/<artifact_id>` (breadcrumbs:
  key -> `/artifacts/key/<key>`, then the id; a details well on the right: key, type, created,
  flow run). Its description, then the rendered content in `section.artifact-data-view`:
    progress  `div.artifact-data-progress`, text "Progress: 100%";
    table     a `table` with one `th` per column (`th[title=<column>]`) and a row per dict;
    markdown  `article.artifact-data-markdown`, the rendered markdown: an image written as
              `![alt](data:image/png;base64,...)` is an `img.markdown-renderer__image` with that src;
  and a "Show raw data" button.

So `open_run_artifacts` opens the run page, clicks the Artifacts tab, collects every card (scrolling
the virtual scrollers), then opens each card's artifact page and reads what it renders there.

The browser is Debian's Chromium (/usr/bin/chromium, apt packages chromium + chromium-driver)
driven by Playwright's Python package (no `playwright install`). Every request that is not for
127.0.0.1 / localhost is aborted and recorded in `page.blocked_requests`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench.distill_throughput import free_port
from mlxcore.serving import die_with_parent

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1000}

# Loopback only: never through a proxy from the environment.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


# ---------------------------------------------------------------- the server


def start_prefect_server(home: Path, timeout: float = 120) -> tuple[str, subprocess.Popen]:
    """`python -m prefect server start` (UI on) on a free loopback port, in its own process group.

    PREFECT_HOME=home (its SQLite DB lands there), log in home/server.log. Returns the base URL
    (`http://127.0.0.1:PORT`; the API is at base + "/api") and the process, once /api/health
    answers. Stop it with `tests.conftest.stop_group(proc)`. Raises RuntimeError with the log's
    tail if it is not healthy within `timeout` seconds (the process is then stopped).
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ,
           "PREFECT_HOME": str(home),
           # The UI's bundle points at :4200 unless told otherwise.
           "PREFECT_UI_API_URL": f"{base}/api",
           "PREFECT_SERVER_UI_API_URL": f"{base}/api",
           "PREFECT_SERVER_UI_ENABLED": "true",
           "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent)  # a killed test run leaves no server behind
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _LOCAL.open(f"{base}/api/health", timeout=2) as r:
                if r.status == 200:
                    return base, proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            from tests.conftest import stop_group

            if proc.poll() is None:
                stop_group(proc)
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"Prefect server at {base} was not healthy within {timeout:.0f} s "
                               f"(exit code {proc.returncode}); {log_path}:\n{tail}")
        time.sleep(0.25)


# ---------------------------------------------------------------- the browser


@contextlib.contextmanager
def browser_page(viewport: dict | None = None):
    """A Playwright sync `page` in Debian's headless Chromium with a fresh profile (a tmp dir).

    Skips the test when /usr/bin/chromium or the playwright package is missing. Requests for any
    host but 127.0.0.1/localhost are aborted; their URLs are listed in `page.blocked_requests`.
    """
    import pytest

    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing (pip install playwright)")

    blocked: list[str] = []

    def only_loopback(route):
        host = urllib.parse.urlsplit(route.request.url).hostname or ""
        if host in _LOOPBACK:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort("addressunreachable")

    profile = tempfile.mkdtemp(prefix="mlxflow-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport=viewport or VIEWPORT)
            try:
                context.route("**/*", only_loopback)
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(30_000)
                page.blocked_requests = blocked
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(page, path: Path) -> Path:
    """A full-page PNG of what the page shows now."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


# ---------------------------------------------------------------- a run's artifacts in the UI

_CARD = 'a[href^="/artifacts/artifact/"]'

_READ_CARDS = """panel => [...panel.querySelectorAll('a[href^="/artifacts/artifact/"]')].map(a => ({
    href: a.getAttribute('href'),
    type: (a.querySelector('.artifact-card__subheader')?.textContent || '').trim().toLowerCase(),
    key: (a.querySelector('.artifact-card__title')?.textContent || '').trim(),
    description: (a.querySelector('.artifact-card__description')?.textContent || '').trim(),
}))"""

_READ_IMAGES = """view => [...view.querySelectorAll('img')].map(img => ({
    alt: img.getAttribute('alt'), complete: img.complete, natural_width: img.naturalWidth,
    natural_height: img.naturalHeight, src_prefix: (img.getAttribute('src') || '').slice(0, 30),
}))"""

_IMAGES_SETTLED = """() => [...document.querySelectorAll('section.artifact-data-view img')].every(i => i.complete)"""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "artifact"


def _collect_cards(page, panel, timeout_s: float) -> list[dict]:
    """Every card in the Artifacts panel, scrolling its virtual scrollers until nothing new shows."""
    panel.locator(f"{_CARD}, .flow-run-artifacts__none").first.wait_for(timeout=timeout_s * 1000)
    cards: dict[str, dict] = {}
    stable_since = time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = len(cards)
        for card in panel.evaluate(_READ_CARDS):
            cards.setdefault(card["href"], card)
        bottoms = panel.locator(".p-virtual-scroller__bottom")
        for i in range(bottoms.count()):
            bottoms.nth(i).scroll_into_view_if_needed()
        if len(cards) != before:
            stable_since = time.monotonic()
        elif time.monotonic() - stable_since > 1.0:
            break
        page.wait_for_timeout(200)
    page.evaluate("() => window.scrollTo(0, 0)")
    return list(cards.values())


def open_run_artifacts(page, base_url: str, flow_run_id: str, *, screenshot_dir: Path | None = None,
                       timeout_s: float = 60) -> dict:
    """Open a flow run's Artifacts tab in the UI, then each artifact's page; return what renders.

    Returns
      run_url      the flow run page
      cards        [{type, key, description, url}] as listed on the run's Artifacts tab
      progress     [{key, text, percent}] from each progress artifact's page ("Progress: 100%" -> 100.0)
      tables       [{key, headers, rows, cells}] from each table artifact's page: its column headers, the
                   number of rows rendered and their texts ([{header: text}])
      markdown     [{key, text}] the rendered markdown's text, per markdown artifact
      images       [{artifact, alt, natural_width, natural_height, src_prefix}] for every <img> in an
                   artifact's rendered content that loaded (img.complete and naturalWidth > 0)
      broken_images  the same for <img>s that did not load
      screenshots  the PNGs written when screenshot_dir is given: run-artifacts.png (the tab),
                   then artifact-<i>-<key>.png per artifact page
    The page is left on the last artifact page opened (cards in the tab's order).
    """
    base = base_url.rstrip("/")
    ms = timeout_s * 1000
    shots: list[str] = []

    def shot(name: str) -> None:
        if screenshot_dir is not None:
            shots.append(str(screenshot(page, Path(screenshot_dir) / name)))

    run_url = f"{base}/runs/flow-run/{flow_run_id}"
    page.goto(run_url)
    tab = page.locator('ul[role="tablist"] li.p-tab#artifacts')
    tab.wait_for(timeout=ms)
    tab.click()
    panel = page.locator("section#artifacts-content .flow-run-artifacts")
    panel.wait_for(timeout=ms)
    cards = _collect_cards(page, panel, timeout_s)
    shot("run-artifacts.png")

    found: dict = {"run_url": run_url, "cards": [], "progress": [], "tables": [], "markdown": [], "images": [],
                   "broken_images": [], "screenshots": shots}
    for i, card in enumerate(cards):
        url = base + card["href"]
        kind, key = card["type"], card["key"]
        found["cards"].append({"type": kind, "key": key, "description": card["description"], "url": url})
        page.goto(url)
        view = page.locator("section.artifact-data-view")
        view.wait_for(timeout=ms)
        if kind == "progress":
            progress = view.locator(".artifact-data-progress")
            progress.wait_for(timeout=ms)
            text = " ".join(progress.inner_text().split())
            m = re.search(r"(-?\d+(?:\.\d+)?)\s*%", text)
            found["progress"].append({"key": key, "text": text, "percent": float(m.group(1)) if m else None})
        elif kind == "table":
            view.locator("table th").first.wait_for(timeout=ms)
            headers = [" ".join(t.split()) for t in view.locator("table thead th").all_inner_texts()]
            cells = view.evaluate("v => [...v.querySelectorAll('table tbody tr')].map("
                                  "tr => [...tr.querySelectorAll('td')].map(td => td.innerText.trim()))")
            found["tables"].append({"key": key, "headers": headers, "rows": len(cells),
                                    "cells": [dict(zip(headers, row)) for row in cells]})
        elif kind == "markdown":
            md = view.locator(".artifact-data-markdown")
            md.wait_for(timeout=ms)
            found["markdown"].append({"key": key, "text": md.inner_text()})
        else:
            view.locator(":scope > *").first.wait_for(timeout=ms)
        page.wait_for_function(_IMAGES_SETTLED, timeout=ms)
        for img in view.evaluate(_READ_IMAGES):
            entry = {"artifact": key, **{k: img[k] for k in ("alt", "natural_width", "natural_height", "src_prefix")}}
            rendered = img["complete"] and img["natural_width"] > 0
            found["images" if rendered else "broken_images"].append(entry)
        shot(f"artifact-{i}-{_slug(key)}.png")
    return found
