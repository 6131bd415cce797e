"""The web extension in headless Chromium (Debian's), on the real ComfyUI frontend: the IDLoRA panel
shows a running job, its progress, loss chart (uPlot), elapsed time and ETA update in place, its Cancel button
cancels the job, and a finished job's Load button adds a LoraLoaderModelOnly node with the job's LoRA."""
from __future__ import annotations

import math
import re
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


def card_sel(job: str) -> str:
    return f'.idlora-job[data-job="{job}"]'


def chart_points(page, job: str) -> int:
    """The number of loss points in the card's uPlot chart (the chart element's data-points)."""
    return int(page.locator(f"{card_sel(job)} .idlora-chart").get_attribute("data-points") or 0)


def open_panel(page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager", timeout=120_000)
    page.locator(".idlora-jobs-tab-button").first.click()


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
    # the loss chart grows while the job runs, in the same card and chart (updated in place, not rebuilt)
    chart = page.locator(f"{card_sel(job)} .idlora-chart").element_handle()
    assert page.locator(f"{card_sel(job)} .idlora-chart .uplot canvas").count() >= 1, "no uPlot chart in the card"
    points = chart_points(page, job)
    t = time.time()
    while chart_points(page, job) <= max(points, 1):
        assert time.time() - t < 60, f"the loss chart did not grow past {points} points"
        time.sleep(0.2)
    page.wait_for_function(f"""() => {{
        const c = document.querySelector('{card_sel(job)}');
        return /elapsed \\d/.test(c?.querySelector('.idlora-elapsed')?.textContent)
            && /ETA \\d/.test(c?.querySelector('.idlora-eta')?.textContent); }}""", timeout=60_000)
    # the first preview sample (the workflow samples every 25 steps) shows in the card
    page.locator(f"{card_sel(job)} img.idlora-sample").wait_for(timeout=120_000)
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0",
                           arg=page.locator(f"{card_sel(job)} img.idlora-sample").element_handle(), timeout=30_000)
    assert chart.evaluate("e => e.isConnected"), "the card was rebuilt instead of updated"
    assert chart_points(page, job) > points
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


def test_finished_job_has_a_load_button(srv, page):
    """After a job succeeds its card shows its whole loss curve and its LoRA; Load adds a stock
    LoraLoaderModelOnly node with lora_name = the job's result.lora to the graph."""
    open_panel(page, srv.url)
    job = start_job(srv, "browser_load", steps=20)
    st = server_util.wait_for(srv, job, server_util.ended, timeout=300)
    assert st["state"] == "succeeded", st
    rows = srv.get(f"/idlora/jobs/{job}/loss?since_step=0")[1]["losses"]
    page.wait_for_function(f"""() => document.querySelector('{card_sel(job)}')?.dataset.state === 'succeeded'
        && document.querySelector('{card_sel(job)} .idlora-chart')?.dataset.points === '{len(rows)}'""",
                           timeout=60_000)
    assert page.locator(f"{card_sel(job)} .idlora-elapsed").inner_text().startswith("took ")
    before = page.evaluate("() => app.graph.nodes.length")
    load = page.locator(f"{card_sel(job)} .idlora-load")
    assert load.count() == 1 and load.get_attribute("data-lora") == st["result"]["lora"]
    load.click()
    added = page.evaluate("""() => app.graph.nodes.filter((n) => n.type === 'LoraLoaderModelOnly')
        .map((n) => n.widgets.find((w) => w.name === 'lora_name').value)""")
    assert added == [st["result"]["lora"]]
    assert page.evaluate("() => app.graph.nodes.length") == before + 1
    page.screenshot(path=str(ARTIFACTS / "panel_succeeded.png"))


def test_multi_phase_job_has_one_colour_per_phase(srv, page):
    """An identity-stylization job (phases content / style_content / style) charts one EMA line per phase. The
    job is a stand-in served by Playwright on the panel's routes (training a real one takes minutes here)."""
    now = time.time()
    fake = {"id": "20261206-000000-phases", "kind": "idstyle", "name": "idstyle_demo", "state": "running",
            "phases": ["content", "style_content", "style"], "phase": "style", "step": 90, "total": 120,
            "loss": 0.31, "sec_per_step": 0.5, "created": now + 1000, "started": now - 45, "finished": None,
            "error": None, "resumes": 0, "result": {"content_lora": "idlora/idstyle_demo_content.safetensors"},
            "folder": "/nowhere"}
    start = {"content": 1, "style_content": 41, "style": 71}
    rows = [{"step": s, "phase": p, "loss": round(0.3 + 0.9 * math.exp(-(s - start[p]) / 12)
                                                  + 0.08 * math.sin(s * 1.7), 4)}
            for s in range(1, 91) for p in [("content" if s <= 40 else "style_content" if s <= 70 else "style")]]

    def jobs(route):
        body = route.fetch().json()
        route.fulfill(json={**body, "jobs": body["jobs"] + [fake]})

    def loss(route):
        since = int(re.search(r"since_step=(\d+)", route.request.url).group(1))
        route.fulfill(json={"losses": [r for r in rows if r["step"] > since]})
    page.route(re.compile(r".*/idlora/jobs(\?.*)?$"), jobs)
    page.route(re.compile(rf".*/idlora/jobs/{fake['id']}/loss\?.*"), loss)
    page.route(re.compile(rf".*/idlora/jobs/{fake['id']}/samples$"), lambda r: r.fulfill(json={"samples": []}))
    try:
        open_panel(page, srv.url)
        chart = page.locator(f"{card_sel(fake['id'])} .idlora-chart")
        chart.wait_for(timeout=60_000)
        page.wait_for_function(f"""() => document.querySelector('{card_sel(fake["id"])} .idlora-chart')
                                      ?.dataset.points === '90'""", timeout=30_000)
        assert chart.get_attribute("data-phases") == "content,style_content,style"
        legend = chart.locator(".u-legend .u-series th").all_inner_texts()
        assert [t.strip() for t in legend] == ["step", "loss", "content", "style_content", "style"]
        load = page.locator(f"{card_sel(fake['id'])} .idlora-load")  # the content LoRA is written already
        assert load.get_attribute("data-lora") == fake["result"]["content_lora"]
        page.locator(card_sel(fake["id"])).screenshot(path=str(ARTIFACTS / "panel_phases.png"))
    finally:
        page.unroute_all()
