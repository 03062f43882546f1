"""End to end in a real browser: the explorer of a tiny run served by Voila on 127.0.0.1, driven by headless Chromium
(selenium + Debian's chromedriver). Changing the explained class must change what the page shows; a screenshot is
saved under the test's tmp folder and its path printed and recorded (`record_property('screenshot', ...)`).

Needs `voila` and `selenium` (pip, with -c constraints.txt) and `apt-get install chromium chromium-driver`; skips
with the reason when any is missing. Every wait has a timeout and the server is killed in `finally`."""
import importlib.util, os, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

pytestmark = pytest.mark.xdist_group("browser")

STARTUP_S, RENDER_S, CHANGE_S = 90, 180, 60      # Voila up; kernel + explorer rendered; one update after a change


def _need():
    "Skip with a clear reason unless Chromium, chromedriver, Voila and selenium are all present."
    chrome = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if chrome is None: pytest.skip("Chromium not found (Debian: apt-get install -y chromium chromium-driver)")
    if driver is None: pytest.skip("chromedriver not found (Debian: apt-get install -y chromium-driver)")
    for mod, how in (("voila", "pip install -c constraints.txt voila"), ("selenium", "pip install -c constraints.txt selenium")):
        if importlib.util.find_spec(mod) is None: pytest.skip(f"{mod} is not installed ({how})")
    voila = Path(sys.executable).parent / "voila"
    if not voila.exists(): pytest.skip(f"the voila command is not next to {sys.executable}")
    return chrome, driver, voila


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _wait_http(url: str, proc, timeout: float):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise RuntimeError(f"voila exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.5)
    raise TimeoutError(f"voila did not answer at {url} within {timeout} s")


def _stop(proc):
    "Terminate the Voila process group we started (Voila and its kernel), then kill it if it lingers."
    if proc.poll() is not None: return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try: os.killpg(proc.pid, sig)
        except ProcessLookupError: return
        try: proc.wait(wait); return
        except subprocess.TimeoutExpired: pass


NOTEBOOK = """import os, torch
torch.set_num_threads(1)
from niwt_nb.widgets import NIWTExplorer
NIWTExplorer(os.environ["NIWT_EXPLORER_RUN"], n_images=6, text_encoder="words")"""


def test_explorer_in_voila_reacts_to_a_new_class_choice(tmp_path, record_property):
    chrome, chromedriver, voila = _need()
    import nbformat
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from niwt_nb.core import ArtifactStore
    from niwt_nb.shapes import ShapesConfig
    from niwt_nb.models import TrainConfig
    from niwt_nb.dom2alpha import Dom2AlphaConfig
    from niwt_nb.alpha2w import Alpha2WConfig
    from niwt_nb.pipeline import RunConfig, run_niwt

    tiny = RunConfig(shapes=ShapesConfig(n_per_class=24), train=TrainConfig(epochs=2, bs=64), dom2alpha=Dom2AlphaConfig(max_epochs=50),
                     alpha2w=Alpha2WConfig(max_steps=100), n_feed=32, baselines=(), explain=False)
    run_niwt(tiny, out=tmp_path / "run", store=ArtifactStore(tmp_path / "store"), log=lambda *a: None, report=False)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(NOTEBOOK)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, tmp_path / "explorer.ipynb")

    port = _free_port(); url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "NIWT_EXPLORER_RUN": str(tmp_path / "run"), "NIWT_QUIET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(tmp_path / "voila.log", "w")
    server = subprocess.Popen([str(voila), "explorer.ipynb", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1"],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    drv, shot = None, tmp_path / "explorer.png"
    try:
        _wait_http(url, server, STARTUP_S)
        opts = webdriver.ChromeOptions()
        opts.binary_location = chrome
        for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1200,950",
                  f"--user-data-dir={tmp_path / 'chrome-profile'}"):
            opts.add_argument(a)
        drv = webdriver.Chrome(service=Service(chromedriver, log_output=str(tmp_path / "chromedriver.log")), options=opts)
        drv.set_page_load_timeout(RENDER_S); drv.set_script_timeout(30)
        drv.get(url)
        text = lambda d: (d.find_elements(By.CSS_SELECTOR, ".niwt-text-view") or [None])[0]
        WebDriverWait(drv, RENDER_S).until(lambda d: text(d) is not None and text(d).text.strip())
        before = text(drv).text
        neurons_before = drv.find_element(By.CSS_SELECTOR, ".niwt-neuron-view").text
        cam_before = drv.find_element(By.CSS_SELECTOR, ".niwt-cam-view").get_attribute("src")
        assert "true:" in before and "Evidence for" in before, before

        sel = Select(drv.find_element(By.CSS_SELECTOR, ".niwt-class-select select"))
        assert sel.first_selected_option.text == "the predicted class"
        pick = next(o for o in sel.options[1:] if o.text.split(" [")[0] not in before)   # a class not shown yet
        name = pick.text.split(" [")[0]
        sel.select_by_visible_text(pick.text)
        WebDriverWait(drv, CHANGE_S).until(lambda d: name in text(d).text)
        after = text(drv).text
        assert after != before and f"Evidence for “{name}”" in after, after
        neurons_after = drv.find_element(By.CSS_SELECTOR, ".niwt-neuron-view").text
        assert name in neurons_after and neurons_after != neurons_before
        assert drv.find_element(By.CSS_SELECTOR, ".niwt-cam-view").get_attribute("src") != cam_before or "map is zero" in \
            drv.find_element(By.CSS_SELECTOR, ".niwt-cam-caption").text
        drv.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        record_property("screenshot", str(shot))
        print(f"screenshot: {shot}")
    finally:
        if drv is not None:
            try: drv.quit()
            except Exception: pass
        _stop(server)
        log.close()
    assert server.poll() is not None, "voila is still running"
