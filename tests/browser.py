"""Headless Chromium for end-to-end page tests: Debian's chromium driven by playwright.

Playwright's own browser download cannot run here (no internet), so we point it at the
system chromium with `executable_path`. `.ci/run` installs the chromium package when it is
missing; tests skip only when neither the browser nor playwright can be had.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

import pytest

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    for name in (os.environ.get("CLOCMLLM_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    pytest.skip("no chromium on this machine: `apt-get install chromium` (done by .ci/run)")


@contextmanager
def browser_page():
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = chromium_path()
    with tempfile.TemporaryDirectory() as profile, sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile,
            executable_path=exe,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 800},
        )
        try:
            yield ctx.new_page()
        finally:
            ctx.close()
