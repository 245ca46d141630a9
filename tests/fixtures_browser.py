"""``browser``: a fresh headless chromium page (tests/browser.py's ``DevTools``) per test; skips without chromium.

A test file that needs domains enabled up front overrides it (test_prefect_ui_browser.py).
"""

from __future__ import annotations

import pytest

from tests.browser import CHROMIUM, MISSING, open_page


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip(MISSING)
    with open_page(tmp_path) as tools:
        yield tools
