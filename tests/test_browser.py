"""End to end in a real browser: the explorer of a tiny run served by Voila on 127.0.0.1, driven by headless Chromium
(selenium + Debian's chromedriver). Changing the explained class and swapping the semantic input must change what the
page shows, on a tiny Shapes run (attributes + captions) and on a tiny run on the real CUB photos of ../shared/data
(attributes + sent; skipped without it), where free text typed in the page also becomes a class. Screenshots are saved
under the test's tmp folder and their paths printed and recorded (`record_property('screenshot', ...)`).

Needs `voila` and `selenium` (pip, with -c constraints.txt) and `apt-get install chromium chromium-driver`; skips
with the reason when any is missing. Every wait has a timeout and the server is killed in `finally`."""
import contextlib, importlib.util, os, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

pytestmark = pytest.mark.xdist_group("browser")

STARTUP_S, RENDER_S, CHANGE_S = 90, 240, 90      # Voila up; kernel + explorer rendered; one update after a change
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"   # where conftest's `shared_data` looks
SEABIRD = "a large seabird with a hooked yellow bill"


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


@contextlib.contextmanager
def _explorer_page(tmp_path, run_dir):
    "Serve an explorer of `run_dir` with Voila and open it in headless Chromium: yields the selenium driver; always cleans up."
    chrome, chromedriver, voila = _need()
    import nbformat
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(NOTEBOOK)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, tmp_path / "explorer.ipynb")
    port = _free_port(); url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "NIWT_EXPLORER_RUN": str(run_dir), "NIWT_QUIET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(tmp_path / "voila.log", "w")
    server = subprocess.Popen([str(voila), "explorer.ipynb", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1"],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    drv = None
    try:
        _wait_http(url, server, STARTUP_S)
        opts = webdriver.ChromeOptions()
        opts.binary_location = chrome
        for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1200,1400",
                  f"--user-data-dir={tmp_path / 'chrome-profile'}"):
            opts.add_argument(a)
        drv = webdriver.Chrome(service=Service(chromedriver, log_output=str(tmp_path / "chromedriver.log")), options=opts)
        drv.set_page_load_timeout(RENDER_S); drv.set_script_timeout(30)
        drv.get(url)
        WebDriverWait(drv, RENDER_S).until(lambda d: _text(d, ".niwt-text-view").strip())
        yield drv
    finally:
        if drv is not None:
            try: drv.quit()
            except Exception: pass
        _stop(server)
        log.close()
    assert server.poll() is not None, "voila is still running"


def _find(drv, css):
    from selenium.webdriver.common.by import By
    return (drv.find_elements(By.CSS_SELECTOR, css) or [None])[0]


def _text(drv, css) -> str:
    el = _find(drv, css)
    return el.text if el is not None else ""


def _shown(drv) -> dict:
    "What the page shows now: the texts of the views and the image sources."
    from selenium.webdriver.common.by import By
    return {"text": _text(drv, ".niwt-text-view"), "neurons": _text(drv, ".niwt-neuron-view"), "compare": _text(drv, ".niwt-compare-view"),
            "cam": _find(drv, ".niwt-cam-view").get_attribute("src"), "pred": _find(drv, ".niwt-pred-view").get_attribute("src")}


def _select_class(drv, kind: str, shown: str) -> str:
    "Pick, in *explain*, a class of `kind` ('seen', 'unseen', 'new') whose name is not in `shown`; returns its name."
    from selenium.webdriver.support.ui import Select
    sel = Select(_find(drv, ".niwt-class-select select"))
    pick = next(o for o in sel.options[1:] if o.text.endswith(f"[{kind}]") and o.text.split(" [")[0] not in shown)
    sel.select_by_visible_text(pick.text)
    return pick.text.split(" [")[0]


def _swap(drv, semantic: str):
    "Click the semantic input button `semantic` and wait until the page says it is in use."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    buttons = drv.find_elements(By.CSS_SELECTOR, ".niwt-semantic-select button")
    assert sorted(b.text.strip() for b in buttons), "no semantic input buttons"
    next(b for b in buttons if b.text.strip() == semantic).click()
    WebDriverWait(drv, CHANGE_S).until(lambda d: f"semantic input: {semantic}" in _text(d, ".niwt-text-view"))


def _screenshot(drv, path, record_property):
    drv.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    record_property("screenshot", str(path))
    print(f"screenshot: {path}")


def _tiny_shapes(tmp_path):
    from niwt_nb.core import ArtifactStore
    from niwt_nb.pipeline import RunConfig, run_niwt
    tiny = RunConfig.tiny(explain=False, semantic="attributes,captions", encoder="tfidf", select=False)
    run_niwt(tiny, out=tmp_path / "run", store=ArtifactStore(tmp_path / "store"), log=lambda *a: None, report=False)
    return tmp_path / "run"


def _tiny_cub(tmp_path, shared):
    from niwt_nb.core import ArtifactStore
    from niwt_nb.models import ModelConfig, TrainConfig
    from niwt_nb.importance import ImportanceConfig
    from niwt_nb.dom2alpha import Dom2AlphaConfig
    from niwt_nb.alpha2w import Alpha2WConfig
    from niwt_nb.pipeline import RunConfig, run_niwt
    cfg = RunConfig(dataset="cub", root=str(shared / "cub"), present_only=True, semantic="attributes,sent", img_size=32,
                    model=ModelConfig(backbone="smallcnn", width=8), train=TrainConfig(epochs=1, bs=64, patience=None),
                    importance=ImportanceConfig(bs=128), dom2alpha=Dom2AlphaConfig(max_epochs=30), alpha2w=Alpha2WConfig(max_steps=60),
                    n_feed=16, baselines=(), explain=False)
    run_niwt(cfg, out=tmp_path / "run", store=ArtifactStore(tmp_path / "store"), log=lambda *a: None, report=False)
    return tmp_path / "run"


def test_explorer_in_voila_reacts_to_a_class_choice_and_a_semantic_swap(tmp_path, record_property):
    _need()
    with _explorer_page(tmp_path, _tiny_shapes(tmp_path)) as drv:
        from selenium.webdriver.support.ui import Select, WebDriverWait
        before = _shown(drv)
        assert "true:" in before["text"] and "Evidence for" in before["text"] and "semantic input: attributes" in before["text"], before
        assert "attributes (in use)" in before["compare"] and "captions" in before["compare"]
        assert Select(_find(drv, ".niwt-class-select select")).first_selected_option.text == "the predicted class"
        name = _select_class(drv, "unseen", before["text"])                    # another class: explained instead
        WebDriverWait(drv, CHANGE_S).until(lambda d: f"Evidence for “{name}”" in _text(d, ".niwt-text-view"))
        chosen = _shown(drv)
        assert name in chosen["neurons"] and chosen["neurons"] != before["neurons"] and name in chosen["compare"]
        assert chosen["cam"] != before["cam"] or "map is zero" in _text(drv, ".niwt-cam-caption")
        _swap(drv, "captions")                                                 # the other semantic input: its unseen rows
        swapped = _shown(drv)
        assert f"Evidence for “{name}”" in swapped["text"] and "under captions" in swapped["neurons"]
        assert swapped["neurons"] != chosen["neurons"] and swapped["pred"] != chosen["pred"]
        assert "captions (in use)" in swapped["compare"]
        _screenshot(drv, tmp_path / "explorer.png", record_property)


def test_cub_explorer_in_voila_swaps_to_sent_and_takes_free_text(tmp_path, record_property):
    _need()
    if not (SHARED / "cub").is_dir(): pytest.skip(f"real CUB files not found at {SHARED / 'cub'} (only present on the project's own machines)")
    from selenium.webdriver.support.ui import WebDriverWait
    with _explorer_page(tmp_path, _tiny_cub(tmp_path, SHARED)) as drv:
        before = _shown(drv)
        assert "semantic inputs: attributes (312-d), sent (1024-d)" in _text(drv, ".niwt-explorer")
        assert "data:image/jpeg;base64" in _find(drv, ".niwt-compare-view").get_attribute("innerHTML")   # bird photos, as JPEG
        assert "bridged by a ridge map attributes → sent" in _text(drv, ".niwt-text-note")
        name = _select_class(drv, "unseen", before["text"])
        WebDriverWait(drv, CHANGE_S).until(lambda d: f"Evidence for “{name}”" in _text(d, ".niwt-text-view"))
        chosen = _shown(drv)
        _swap(drv, "sent")
        swapped = _shown(drv)
        assert swapped["neurons"] != chosen["neurons"] and swapped["pred"] != chosen["pred"] and "sent (in use)" in swapped["compare"]
        _find(drv, ".niwt-text-box textarea").send_keys(SEABIRD)              # free text becomes a class under both inputs
        _find(drv, ".niwt-name-box input").send_keys("seabird")
        _find(drv, ".niwt-add-button").click()
        WebDriverWait(drv, CHANGE_S).until(lambda d: "added" in _text(d, ".niwt-status"))
        status = _text(drv, ".niwt-status")
        assert "hooked bill shape" in status and "yellow bill color" in status and "bridged to sent" in status, status
        WebDriverWait(drv, CHANGE_S).until(lambda d: "Evidence for “seabird” (new)" in _text(d, ".niwt-text-view"))
        new_sent = _shown(drv)
        assert "seabird" in new_sent["neurons"] and "under sent" in new_sent["neurons"]
        _swap(drv, "attributes")
        new_att = _shown(drv)
        assert "Evidence for “seabird” (new)" in new_att["text"] and new_att["neurons"] != new_sent["neurons"]
        _screenshot(drv, tmp_path / "explorer_cub.png", record_property)
