"""The scoring page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

A real teacher (tiny BLIP, scoring service, uvicorn) serves the page; the browser uploads or drops
an image, types sentences or triplets, and the test reads the ranked bars, checks that markup in
user text stays text, and looks at the pixels of a screenshot.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright
from testkit import REPO
from testkit.http import RunningHttp, running_http
from testkit.teacher import png_bytes, teacher_settings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# wait_for_function takes function sources ("() => ..."): a bare expression is eval()'d by
# Playwright inside the page on every poll after the first, which the page's CSP (no
# 'unsafe-eval') blocks, so such a wait failed whenever its condition was not true at once.
VIEWPORT = {"width": 1280, "height": 800}
ASSET = REPO / "teacher_server" / "assets" / "person_riding_horse.jpg"
XSS = "<img src=x onerror=alert(1)>"
FRESH_RGB = (0x25, 0x63, 0xC9)  # --fresh in style.css
CACHED_RGB = (0x1F, 0x8A, 0x4C)  # --cached
TOKEN = "page-token"
SENTENCES = ["a person ride a horse", "a person feed a horse", "a person hold a cup"]


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningHttp]:
    with running_http(teacher_settings(tiny_blip_dir, max_sentence_tokens=32)) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Visit:
    """A page plus what it did: requested URLs, dialogs (alert = script ran), console errors."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.console_errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("dialog", self._dialog)
        page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def only_visited(self, origin: str) -> None:
        foreign = [url for url in self.requests if not url.startswith((origin, "blob:", "data:"))]
        assert not foreign, f"the page reached beyond its server: {foreign}"


@pytest.fixture
def visit(browser: Browser) -> Iterator[Visit]:
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    try:
        yield Visit(context.new_page())
    finally:
        context.close()


def score(page: Page, mode: str, text: str) -> None:
    page.check(f'input[name="mode"][value="{mode}"]')
    page.fill("#lines", text)
    page.click("#score-button")


def drop_file(page: Page, name: str, data: bytes) -> None:
    """Drop a file on the drop zone as a person dragging it from the desktop would."""
    page.evaluate(
        """([name, encoded]) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            document.getElementById("drop-zone").dispatchEvent(
                new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        [name, base64.b64encode(data).decode("ascii")],
    )


def test_upload_sentences_render_ranked_bars_as_text(visit: Visit, teacher: RunningHttp, tmp_path: Path) -> None:
    page = visit.page
    page.goto(f"{teacher.url}/")
    expect(page.locator("#model-info")).to_contain_text(teacher.service.fingerprint)
    page.set_input_files("#image-input", str(ASSET))
    expect(page.locator("#preview")).to_be_visible()
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")

    sentences = ["a person ride a horse", XSS, "a person feed a horse", "a person hold a cup"]
    score(page, "sentences", "\n".join(sentences) + "\n\n")  # blank lines are ignored
    rows = page.locator("#results li")
    expect(rows).to_have_count(4)

    labels = page.locator("#results .label").all_text_contents()
    assert sorted(labels) == sorted(sentences)
    assert page.locator("#results img").count() == 0  # the markup stayed text
    assert not visit.dialogs
    values = [float(text) for text in page.locator("#results .value").all_text_contents()]
    assert values == sorted(values, reverse=True)
    assert page.locator("#results .origin").all_text_contents() == ["new"] * 4

    # The page shows the order the API ranks in (the same scores, now cached).
    api = httpx.post(
        f"{teacher.url}/v1/score?sort=desc",
        timeout=60,
        files={"image": ("a.jpg", ASSET.read_bytes())},
        data={"sentences": sentences},
    ).json()
    assert [row["sentence"] for row in api["scores"]] == labels
    assert values == [round(row["match_prob"], 3) for row in api["scores"]]

    screenshot = tmp_path / "page.png"
    page.screenshot(path=str(screenshot))
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
    box = page.locator("#results .bar").first.bounding_box()
    assert box is not None and box["width"] > 10, box
    bar = image.crop(
        (
            int(box["x"]) + 1,
            int(box["y"]) + 1,
            int(box["x"] + box["width"]) - 1,
            int(box["y"] + box["height"]) - 1,
        )
    )
    pixels = np.asarray(bar, dtype=np.int32).reshape(-1, 3)
    share = float((np.abs(pixels - np.array(FRESH_RGB)).max(axis=1) <= 12).mean())
    assert share > 0.9, f"bar area is mostly not the bar colour ({share:.0%})"

    # Scoring again: every answer now comes from the cache, and the bars say so.
    page.click("#score-button")
    expect(page.locator("#results .origin").first).to_have_text("cached")
    assert page.locator("#results .origin").all_text_contents() == ["cached"] * 4
    expect(page.locator("#summary")).to_contain_text("4 scored, 4 from the cache")
    colour = page.locator("#results .bar").first.evaluate("bar => getComputedStyle(bar).backgroundColor")
    assert colour == f"rgb({CACHED_RGB[0]}, {CACHED_RGB[1]}, {CACHED_RGB[2]})"
    visit.only_visited(teacher.url)
    assert not visit.console_errors


def test_dropped_image_and_triplets(visit: Visit, teacher: RunningHttp) -> None:
    page = visit.page
    page.goto(f"{teacher.url}/")
    drop_file(page, "dropped <b>name</b>.png", png_bytes(7, (64, 48)))
    expect(page.locator("#drop-label")).to_contain_text("dropped <b>name</b>.png")
    expect(page.locator("#preview")).to_be_visible()
    score(page, "triplets", "ride horse\nhop_on airplane\n<b>bold</b> cup")
    expect(page.locator("#results li")).to_have_count(3)
    labels = page.locator("#results .label").all_text_contents()
    assert sorted(labels) == sorted(
        ["a person ride a horse", "a person hop on an airplane", "a person <b>bold</b> a cup"]
    )
    assert page.locator("#results b, #drop-zone b").count() == 0
    visit.only_visited(teacher.url)


def test_errors_are_shown_as_text(visit: Visit, teacher: RunningHttp) -> None:
    page = visit.page
    page.goto(f"{teacher.url}/")
    page.click("#score-button")
    expect(page.locator("#status")).to_have_text("Pick or drop an image first.")
    page.set_input_files("#image-input", str(ASSET))
    score(page, "sentences", "a person ride a horse\n" + "<i>long</i> " * 20)
    status = page.locator("#status")
    expect(status).to_contain_text("Error 422: sentences[1]:")
    expect(status).to_contain_text("over the limit of 32 tokens")
    expect(status).to_have_class("error")
    assert page.locator("#status i").count() == 0
    expect(page.locator("#results li")).to_have_count(0)


def test_token_is_asked_for_and_sent(visit: Visit, tiny_blip_dir: Path) -> None:
    with running_http(teacher_settings(tiny_blip_dir, auth_token=TOKEN)) as teacher:
        page = visit.page
        page.goto(f"{teacher.url}/")
        expect(page.locator("#model-info")).to_contain_text("needs an access token")
        page.set_input_files("#image-input", str(ASSET))
        score(page, "triplets", "ride horse")
        expect(page.locator("#status")).to_contain_text("Error 401")
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")
        expect(page.locator("#model-info")).to_contain_text(teacher.service.fingerprint)
        page.click("#score-button")
        expect(page.locator("#results li")).to_have_count(1)
        expect(page.locator("#results .label")).to_have_text("a person ride a horse")


def test_api_docs_render_offline(visit: Visit, teacher: RunningHttp) -> None:
    page = visit.page
    response = page.goto(f"{teacher.url}/docs")
    assert response is not None and "script-src 'self' 'sha256-" in response.headers["content-security-policy"]
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("hoi-distill teacher")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert {"/v1/score", "/v1/score/triplets", "/v1/model"} <= {path.strip() for path in paths}
    page.locator(".opblock-summary").first.click()  # expanding an operation renders its schemas
    expect(page.locator(".opblock-body").first).to_be_visible()
    visit.only_visited(teacher.url)
    assert not visit.console_errors  # Swagger UI works under its CSP: a violation would be one


# ------------------------------------------------------------------------------ region boxes
def drag(page: Page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Press, move and release the mouse as a person drawing a box (page coordinates)."""
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=6)
    page.mouse.up()


def test_drawn_boxes_score_the_pair_in_original_pixels(visit: Visit, teacher: RunningHttp, tmp_path: Path) -> None:
    page = visit.page
    # Three times the asset's size: the page shows it scaled down, so screen pixels are not the
    # image's, and the boxes must be mapped back.
    big = tmp_path / "big.jpg"
    with Image.open(ASSET) as asset:
        asset.resize((960, 720)).save(big, quality=92)
    natural = (960, 720)
    page.goto(f"{teacher.url}/")
    expect(page.locator("#model-info")).to_contain_text("region policy crop:margin=0.1")
    page.set_input_files("#image-input", str(big))
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
    expect(page.locator("#region-state")).to_have_text("No boxes: the whole image is scored.")
    shown = page.locator("#preview").bounding_box()
    assert shown is not None
    scale = shown["width"] / natural[0]
    assert scale < 0.5, shown  # really scaled down

    def at(fx: float, fy: float) -> tuple[float, float]:
        """A point of the image on screen now (scrolling moves it: clicks below scroll the page)."""
        now = page.locator("#preview").bounding_box()
        assert now is not None
        return now["x"] + fx * now["width"], now["y"] + fy * now["height"]

    # Human: from 10 %, 10 % to 45 %, 80 % of the image; object: 35 %, 40 % to 90 %, 95 %.
    human, obj = (0.10, 0.10, 0.45, 0.80), (0.35, 0.40, 0.90, 0.95)
    drag(page, at(*human[:2]), at(*human[2:]))
    expect(page.locator("#box-human")).to_be_visible()
    expect(page.locator("#box-object")).to_be_hidden()
    expect(page.locator("#region-state")).to_contain_text("now draw the object box")
    page.check('input[name="mode"][value="sentences"]')
    page.fill("#lines", "\n".join(SENTENCES))
    page.click("#score-button")  # one box is not a pair
    expect(page.locator("#status")).to_contain_text("Draw the object box too")
    drag(page, at(*obj[2:]), at(*obj[:2]))  # drawn from its bottom-right corner: the same box
    expect(page.locator("#box-object")).to_be_visible()
    assert page.locator("#box-human .tag").text_content() == "human"
    assert page.locator("#box-object .tag").text_content() == "object"
    colours = [
        page.locator(f"#box-{kind}").evaluate("box => getComputedStyle(box).borderTopColor")
        for kind in ("human", "object")
    ]
    assert colours[0] != colours[1]
    # The boxes sit where they were drawn (on screen, within a pixel).
    drawn = page.locator("#box-object").bounding_box()
    assert drawn is not None
    assert (drawn["x"], drawn["y"]) == pytest.approx(at(*obj[:2]), abs=1.5)

    # Chromium does not show Playwright a multipart body holding a file, so the region is read
    # from the server's answer: it echoes the region it parsed from the request.
    with page.expect_response(
        lambda response: response.request.method == "POST" and "/v1/score" in response.url
    ) as got:
        page.click("#score-button")
    expect(page.locator("#results li")).to_have_count(len(SENTENCES))
    region = got.value.json()["region"]
    assert region is not None, "the server got no region"
    # In original pixels: the drawn fractions of 960 x 720, to within one screen pixel.
    tolerance = 1 / scale + 0.1
    for key, fractions in (("human_box", human), ("object_box", obj)):
        expected = [f * size for f, size in zip(fractions, natural * 2, strict=True)]
        assert region[key] == pytest.approx(expected, abs=tolerance), (key, region[key], expected)
    expect(page.locator("#scope")).to_contain_text("For the pair: human [")
    expect(page.locator("#scope")).to_contain_text("crop:margin=0.1")
    values = [float(v) for v in page.locator("#results .value").all_text_contents()]
    labels = page.locator("#results .label").all_text_contents()

    # The API, asked directly about that pair, answers from the cache the page filled: the server
    # got this region. The whole image scores differently.
    with teacher.client() as web:
        pair = web.post(
            "/v1/score?sort=desc",
            json={"image": b64_file(big), "sentences": SENTENCES, "region": region},
        ).json()
        whole = web.post("/v1/score?sort=desc", json={"image": b64_file(big), "sentences": SENTENCES}).json()
    assert [row["cached"] for row in pair["scores"]] == [True] * len(SENTENCES)
    assert [row["sentence"] for row in pair["scores"]] == labels
    assert values == [round(row["match_prob"], 3) for row in pair["scores"]]
    by_sentence = {row["sentence"]: row["match_prob"] for row in whole["scores"]}
    assert [row["match_prob"] for row in pair["scores"]] != pytest.approx(
        [by_sentence[row["sentence"]] for row in pair["scores"]], abs=1e-4
    )

    # Clearing the boxes scores the whole image again, without a region field.
    page.click("#clear-boxes")
    expect(page.locator("#box-human")).to_be_hidden()
    expect(page.locator("#box-object")).to_be_hidden()
    with page.expect_response(
        lambda response: response.request.method == "POST" and "/v1/score" in response.url
    ) as got:
        page.click("#score-button")
    expect(page.locator("#scope")).to_have_text("For the whole image")
    assert got.value.json()["region"] is None
    expect(page.locator("#results .origin").first).to_have_text("cached")  # the call above scored it
    shown_whole = [float(v) for v in page.locator("#results .value").all_text_contents()]
    assert shown_whole == [round(row["match_prob"], 3) for row in whole["scores"]]
    visit.only_visited(teacher.url)
    assert not visit.console_errors  # a CSP violation would be one


def b64_file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


# ------------------------------------------------------------------------------ evidence maps
def stage_pixels(page: Page, path: Path) -> np.ndarray:
    """The image on screen (the preview's box, 2 px inside its rounded corners), as RGB integers."""
    page.screenshot(path=str(path))
    box = page.locator("#preview").bounding_box()
    assert box is not None and box["width"] > 40, box
    with Image.open(path) as shot:
        crop = shot.convert("RGB").crop(
            (int(box["x"]) + 2, int(box["y"]) + 2, int(box["x"] + box["width"]) - 2, int(box["y"] + box["height"]) - 2)
        )
    return np.asarray(crop, dtype=np.int32)


def test_clicking_a_sentence_shows_its_evidence_map_over_the_image(
    visit: Visit, teacher: RunningHttp, tmp_path: Path
) -> None:
    page = visit.page
    page.goto(f"{teacher.url}/")
    page.set_input_files("#image-input", str(ASSET))
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
    score(page, "sentences", "\n".join(SENTENCES))
    expect(page.locator("#results li")).to_have_count(3)
    expect(page.locator("#evidence-tools")).to_be_visible()
    plain = stage_pixels(page, tmp_path / "plain.png")

    row = page.locator("#results li").first
    sentence = row.locator(".label").text_content()
    with page.expect_response(lambda response: "/v1/explain" in response.url) as got:
        row.click()
    assert got.value.status == 200 and got.value.headers["content-type"] == "image/png"
    page.wait_for_function(
        "() => document.getElementById('evidence').complete && document.getElementById('evidence').naturalWidth > 0"
    )
    expect(page.locator("#evidence")).to_be_visible()
    expect(row).to_have_class(re.compile(r"\bexplained\b"))
    expect(page.locator("#status")).to_contain_text(f"Evidence map of “{sentence}”")
    mapped = stage_pixels(page, tmp_path / "mapped.png")
    assert mapped.shape == plain.shape

    # The API's own PNG for that sentence, scaled to the screen: the page shows it, not the photo.
    with teacher.client() as web:
        answer = web.post(
            "/v1/explain",
            files={"image": ("asset.jpg", ASSET.read_bytes())},
            data={"sentences": [sentence], "format": "png"},
        )
    height, width = plain.shape[:2]
    box = page.locator("#preview").bounding_box()
    assert box is not None
    with Image.open(io.BytesIO(answer.content)) as expected_png:
        expected = expected_png.convert("RGB").resize(
            (round(box["width"]), round(box["height"])), Image.Resampling.BILINEAR
        )
    expected_pixels = np.asarray(expected, dtype=np.int32)[2 : 2 + height, 2 : 2 + width]
    to_map, to_plain = np.abs(mapped - expected_pixels).mean(), np.abs(mapped - plain).mean()
    assert to_plain > 10, f"the image hardly changed ({to_plain:.1f} levels on average)"
    assert to_map < to_plain / 3, (to_map, to_plain)
    # Towards the heat colours: the shown image gained saturated colour that the photo lacks.
    saturation = lambda pixels: (pixels.max(axis=2) - pixels.min(axis=2)).mean()  # noqa: E731
    assert saturation(mapped) > saturation(plain) + 10

    # The toggle shows the plain image again, and the map once more.
    page.click("#toggle-evidence")
    expect(page.locator("#evidence")).to_be_hidden()
    expect(page.locator("#toggle-evidence")).to_have_text("Show evidence map")
    assert np.abs(stage_pixels(page, tmp_path / "again.png") - plain).mean() < 2
    page.click("#toggle-evidence")
    expect(page.locator("#evidence")).to_be_visible()
    visit.only_visited(teacher.url)
    assert not visit.console_errors
