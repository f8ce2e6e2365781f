"""The interactive spectrum explorer in a real browser: JupyterLab + Debian's chromium, driven by playwright.

Needs `apt-get install chromium` and `pip install playwright` (its own browser download is not used); skipped
with the reason otherwise.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason='no chromium: apt-get install chromium')]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    shutil.copy(ROOT / 'notebooks' / 'spectrum.ipynb', tmp_path / 'spectrum.ipynb')
    port, token = _free_port(), 'toukit-test'
    log = open(tmp_path / 'lab.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', f'--port={port}', '--ip=127.0.0.1',
                             f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={tmp_path}', '--allow-root'],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, JUPYTER_PLATFORM_DIRS='1'))
    url = f'http://127.0.0.1:{port}'
    for _ in range(120):
        try:
            urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail('JupyterLab did not start: ' + (tmp_path / 'lab.log').read_text()[-2000:])
    yield url, token, tmp_path
    proc.terminate()
    proc.wait(timeout=30)


def test_threshold_slider_changes_what_the_explorer_shows(lab):
    sync_api = pytest.importorskip('playwright.sync_api', reason='pip install playwright')
    url, token, folder = lab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
        page = browser.new_page(viewport=dict(width=1400, height=1000))
        page.goto(f'{url}/lab/tree/spectrum.ipynb?token={token}')
        page.wait_for_selector('.jp-Notebook', timeout=120_000)
        page.wait_for_selector('.jp-Notebook-ExecutionIndicator, .jp-mod-idle, .jp-Toolbar', timeout=120_000)
        time.sleep(3)  # the kernel comes up
        page.click('text=Run', timeout=30_000)
        page.click('text=Run All Cells', timeout=30_000)
        readout = page.wait_for_selector('.widget-readout', timeout=300_000)
        shown = page.wait_for_selector('text=/threshold 0\\.900/', timeout=120_000)
        before = shown.inner_text()
        readout.click()
        page.keyboard.press('Control+A')
        page.keyboard.type('0.95')
        page.keyboard.press('Enter')
        after = page.wait_for_selector('text=/threshold 0\\.950/', timeout=60_000).inner_text()
        page.screenshot(path=str(folder / 'explorer.png'), full_page=False)
        body = page.inner_text('body')
        browser.close()
    assert before != after and 'threshold 0.950' in after
    assert 'Error displaying widget' not in body and 'Failed to load model class' not in body
    keep = os.environ.get('TOUKIT_EXPLORER_SCREENSHOT')
    if keep:
        shutil.copy(folder / 'explorer.png', keep)
