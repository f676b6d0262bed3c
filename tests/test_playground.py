"""The playground page in a real headless browser (Debian's Chromium, driven by Playwright) against
`serve run deploy/config.yaml`: the page loads with the tiers, a request streams its drafts (each replacing the
last) before its final text, the usage shows, a screenshot is saved (runs/playground.png), and a JSON schema in
its box makes the answer one that validates."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jsonschema
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BROWSER = os.environ.get("PLAYGROUND_BROWSER") or shutil.which("chromium") or "/usr/bin/chromium"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}}, "required": ["answer"]}


def test_the_playground_shows_the_canvas_denoising_live(shipped_app):
    from playwright.sync_api import sync_playwright

    assert Path(BROWSER).exists(), f"no Chromium at {BROWSER}: run tests/install_system.sh"
    shot = ROOT / "runs" / "playground.png"
    shot.parent.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{shipped_app.http}/playground")
            page.wait_for_function("document.getElementById('tier').options.length >= 3")
            tiers = page.eval_on_selector_all("#tier option", "os => os.map(o => o.value)")
            assert set(tiers) == {"fast", "balanced", "quality"}

            # record every draft the page shows, in order, before the final text arrives
            page.evaluate(
                """() => { window.seen = [];
                   new MutationObserver(() => { const d = document.querySelector('#answer .draft');
                       if (d) window.seen.push(d.textContent); })
                     .observe(document.getElementById('answer'), {childList: true, subtree: true}); }"""
            )
            page.fill("#prompt", "pick 3 distinct: a b c d e")
            page.select_option("#tier", "quality")
            page.fill("#steps", "12")
            page.fill("#seed", "0")
            page.click("#go")
            page.wait_for_function("document.body.dataset.state === 'done'", timeout=120_000)
            drafts = int(page.evaluate("document.body.dataset.drafts"))
            seen = page.evaluate("window.seen")
            final = page.text_content("#final")
            usage = page.inner_text("#usage")
            page.screenshot(path=str(shot), full_page=True)

            # a schema's answer denoising: the same page with structured outputs
            page.evaluate("document.body.dataset.state = ''")
            page.fill("#prompt", "sort: 4213")
            page.fill("#schema", json.dumps(SCHEMA))
            page.click("#go")
            page.wait_for_function("document.body.dataset.state === 'done'", timeout=120_000)
            shaped = page.text_content("#final")
        finally:
            browser.close()
    assert not errors, errors
    assert drafts >= 2 and len(seen) >= 2  # the canvas was shown denoising, step after step
    assert final.strip() and len(final.split()) == 3 and len(set(final.split())) == 3, final
    assert "steps per canvas" in usage and "tokens/s" in usage and "time to first canvas" in usage
    assert shot.stat().st_size > 10_000
    jsonschema.validate(json.loads(shaped), SCHEMA)
    print(f"{drafts} drafts; final {final!r}; screenshot {shot}")
