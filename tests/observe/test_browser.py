"""The sample page in a real browser: headless Chromium renders it, switches the series, and the page
makes no network request.

Chromium comes from the Debian package (`apt-get install -y chromium`); without it the tests skip.
`$JAXRL_DENSE_CHROMIUM` names another binary. `$JAXRL_DENSE_BROWSER_PAGE` points the tests at an
existing page written by `jaxrl_dense.observe.viz` (e.g. a smoke run's `<logdir>/samples/step_00001.html`);
by default they build a tiny deterministic page.

How the checks work:
* series switch: the page reads `#series=NAME` from its URL (the drop-down writes the same hash),
  so loading `page.html#series=entropy` is what a click on the drop-down does; `--dump-dom` gives the
  DOM after the page's script ran (`<body data-series=...>`, the legend label, the token colours),
  and the screenshots of two series differ.
* non-blank: the screenshot's pixel standard deviation is well above 0.
* no network: Chromium writes a NetLog (`--log-net-log`) of every URL request; requests started by
  a page carry the page's origin as initiator ("null" for file://), Chromium's own background
  requests carry "not an origin". No page-initiated request to anything but file:// may appear;
  a control page that loads an http:// image proves the detector sees such requests. All traffic
  also goes to an unreachable proxy, so nothing leaves the machine even if a check were wrong.
"""
import json
import os
import pathlib
import re
import subprocess

import numpy as np
import pytest

from jaxrl_dense.observe import viz


CHROMIUM = viz.find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install -y chromium)")
FLAGS = list(viz.CHROMIUM_FLAGS)


def _run(tmp_path, url, *extra, timeout=90):
  profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
  cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  assert res.returncode == 0, f"{cmd} failed ({res.returncode}): {res.stderr[-2000:]}"
  return res.stdout


@pytest.fixture(scope="module")
def page(tmp_path_factory):
  given = os.environ.get("JAXRL_DENSE_BROWSER_PAGE")
  if given:
    return pathlib.Path(given).resolve()
  from tests.observe.test_viz import example_groups  # the same tiny deterministic batch as the unit tests
  prompts, texts, series, mask, acc = example_groups()
  groups = viz.groups_from_batch(prompts, texts, series, mask, acc, n=3)
  return viz.write_html(tmp_path_factory.mktemp("page") / "page.html", groups, title="browser test")


def _series_names(page_path):
  data = re.search(r'<script type="application/json" id="viz-data">(.*?)</script>',
                   page_path.read_text(encoding="utf-8"), re.S)
  return [s["name"] for s in json.loads(data.group(1))["series"]]


def _screenshot(tmp_path, page_path, series, name):
  import matplotlib.image as mpimg
  out = viz.screenshot(page_path, tmp_path / name, series=series, size=(1200, 900), chromium=CHROMIUM)
  img = mpimg.imread(out)[..., :3]
  assert img.shape[:2] == (900, 1200)
  return img


def _page_requests(netlog_path):
  """URLs of URL requests started by a page (initiator set and not 'not an origin')."""
  log = json.loads(pathlib.Path(netlog_path).read_text())
  names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
  urls = []
  for ev in log["events"]:
    p = ev.get("params") or {}
    if names.get(ev["type"]) == "URL_REQUEST_START_JOB" and "url" in p:
      if p.get("initiator", "not an origin") != "not an origin":
        urls.append(p["url"])
  return urls


def test_switch_series_and_screenshot(page, tmp_path):
  names = _series_names(page)
  assert len(names) >= 2
  first, other = names[0], names[-1]
  url = page.as_uri()
  dom_default = _run(tmp_path, url, "--dump-dom")
  dom_other = _run(tmp_path, f"{url}#series={other}", "--dump-dom")
  assert f'<body data-series="{first}"' in dom_default
  assert f'<body data-series="{other}"' in dom_other
  label = lambda dom: re.search(r'id="series-label">([^<]*)<', dom).group(1)
  assert label(dom_other) == viz.SERIES.get(other, other) != label(dom_default)
  colours = lambda dom: re.findall(r'class="tok"[^>]*style="background: ?(rgb\([^)]*\))', dom)
  assert colours(dom_default) and len(colours(dom_default)) == len(colours(dom_other))
  assert colours(dom_default) != colours(dom_other)  # the script recoloured every token
  img_default = _screenshot(tmp_path, page, None, "default.png")
  img_other = _screenshot(tmp_path, page, other, "other.png")
  for img in (img_default, img_other):
    assert img.std() > 0.05, "blank screenshot"
    assert (np.abs(img - img[..., :1]).sum(-1) > 0.1).mean() > 0.002, "no coloured tokens"
  assert np.abs(img_default - img_other).max() > 0.2  # the colours changed on screen


def test_page_makes_no_network_request(page, tmp_path):
  text = page.read_text(encoding="utf-8").lower()
  for needle in ("http://", "https://", " src=", " href=", "@import", "url("):
    assert needle not in text, needle
  netlog = tmp_path / "page.netlog.json"
  _run(tmp_path, page.as_uri(), f"--log-net-log={netlog}", "--dump-dom")
  assert _page_requests(netlog) == []
  # Control: the detector sees a page's request (and the page still renders with no network).
  control = tmp_path / "control.html"
  control.write_text('<html><body>x<img src="http://example.invalid/a.png"></body></html>')
  ctl_log = tmp_path / "control.netlog.json"
  _run(tmp_path, control.as_uri(), f"--log-net-log={ctl_log}", "--dump-dom")
  assert "http://example.invalid/a.png" in _page_requests(ctl_log)
