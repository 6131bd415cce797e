"""The web extension in headless Chromium (Debian's), on the real ComfyUI frontend: the IDLoRA panel
shows a running job, its progress rises, and its Cancel button cancels the job."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

import server_util

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test_artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def chromium_path() -> str:
    path = shutil.which("chromium")
    if not path:
        pytest.fail("Debian's chromium is not installed: ./idlora test installs it (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 900})
        yield pg
        browser.close()


start_job = server_util.start_job


def progress_width(card) -> float:
    return float(card.locator(".idlora-progress-fill").evaluate("e => parseFloat(e.style.width)"))


def test_panel_shows_job_progress_and_cancels_it(srv, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(srv.url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager", timeout=120_000)
    job = start_job(srv, "browser_job", steps=400)
    page.locator(".idlora-jobs-tab-button").first.click()
    card = page.locator(f'.idlora-job[data-job="{job}"]')
    card.wait_for(timeout=60_000)
    page.wait_for_function(f"""() => document.querySelector('.idlora-job[data-job="{job}"]')
                                  ?.dataset.state === 'running'""", timeout=60_000)
    first = progress_width(card)
    t = time.time()
    while progress_width(page.locator(f'.idlora-job[data-job="{job}"]')) <= first:
        assert time.time() - t < 60, "the progress bar did not rise"
        time.sleep(0.2)
    page.screenshot(path=str(ARTIFACTS / "panel_running.png"))
    page.locator(f'.idlora-job[data-job="{job}"] .idlora-cancel').click()
    page.wait_for_function(f"""() => document.querySelector('.idlora-job[data-job="{job}"]')
                                  ?.dataset.state === 'cancelled'""", timeout=60_000)
    assert srv.get(f"/idlora/jobs/{job}")[1]["state"] == "cancelled"
    page.screenshot(path=str(ARTIFACTS / "panel_cancelled.png"))
    assert page.locator(f'.idlora-job[data-job="{job}"] .idlora-resume').count() == 1


def test_panel_rebuilds_after_reload(srv, page):
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function("() => window.app && window.app.extensionManager", timeout=120_000)
    page.locator(".idlora-jobs-tab-button").first.click()
    page.locator(".idlora-job").first.wait_for(timeout=60_000)
    assert page.locator(".idlora-job").count() == len(srv.get("/idlora/jobs")[1]["jobs"])


def test_every_node_with_a_job_shows_its_progress(srv, page):
    """The extension decorates nodes by their job wire type (IDLORA_JOB in or out), so a new job node needs no JS
    change: every such node of the pack is decorated."""
    info = srv.get("/object_info")[1]

    def has_job(d: dict) -> bool:
        inputs = {**d["input"].get("required", {}), **d["input"].get("optional", {})}
        return "IDLORA_JOB" in d["output"] or any(v and v[0] == "IDLORA_JOB" for v in inputs.values())
    names = sorted(n for n, d in info.items() if has_job(d))
    assert len(names) >= 11 and "IDLoRAMetaLoRAStage1" in names, names
    page.goto(srv.url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app && window.LiteGraph && window.app.extensionManager", timeout=120_000)
    decorated = page.evaluate("(names) => names.filter((n) => "
                              "window.LiteGraph.registered_node_types[n]?.prototype.idloraShowsJob === true)", names)
    assert decorated == names
