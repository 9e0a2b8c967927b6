"""The playground page (GET /) in a real headless browser, Debian's chromium driven by selenium, against real Ray
Serve on the shipped digits-s checkpoint and its 4-step student: a digit generated from the keyboard streams its
progress to the end and shows the very PNGs the API returns for that request, "Same seed again" draws the same
images whether the seed was typed (past 2**53 too) or drawn by the engine, a 400 is shown naming its field, every
control has a label, the page reflows at 200% zoom, a student offers only its step counts, and on a model's own
route (relative URLs under its prefix) with API keys on it asks for a key and sends it as a Bearer token, storing
nothing.

`DIT_PLAYGROUND_SCREENSHOT=docs/playground.png` saves the page after its grid of four digits (the README's picture).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from serve_helpers import free_port, model_args

ray = pytest.importorskip("ray")
pytest.importorskip("selenium", reason="selenium drives the browser: pip install -e '.[test]'")
from ray import serve  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from serving.app import build_app, build_model_app  # noqa: E402

SHIPPED_DIGITS_S = Path(__file__).resolve().parents[2] / "checkpoints" / "digits-s.safetensors"
SHIPPED_STUDENT = SHIPPED_DIGITS_S.with_name("digits-s-4step.safetensors")
LIMITS = {"max_images_per_request": 4, "max_inference_steps": 60}
KEYS_ENV = "DIT_TEST_PLAYGROUND_KEYS"
KEY = "sk-playground"
MODEL_ROUTE = "/models/digits-s/"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (`make sysdeps` installs them)")
WAIT_S = 30


@pytest.fixture(scope="module")
def base():
    """The gateway on / without keys; digits-s serving the API itself on /models/digits-s/ with a key."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEYS_ENV, KEY)  # inherited by the Ray processes started below
        env.delenv("DIT_API_KEYS", raising=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        model = model_args("digits-s", SHIPPED_DIGITS_S)
        student = model_args("digits-s-4step", SHIPPED_STUDENT)
        serve.run(build_app({"limits": LIMITS, "models": [model, student]}), name="dit", route_prefix="/")
        serve.run(build_model_app({"limits": LIMITS, "auth": {"api_keys_env": KEYS_ENV}, "models": [model]}),
                  name="digits-s", route_prefix=MODEL_ROUTE.rstrip("/"))
        yield f"http://127.0.0.1:{port}"
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def wait(driver, condition, what: str):
    """``condition``'s first truthy value; on a timeout, the message says what the page showed."""
    def shown() -> str:
        return " | ".join(f"#{i}: {driver.find_element(By.ID, i).text!r}" for i in ("progress-text", "error"))
    try:
        return WebDriverWait(driver, WAIT_S).until(condition)
    except TimeoutException:
        raise AssertionError(f"after {WAIT_S} s still waiting for {what}; the page shows {shown()}") from None


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"), "the model list")


def fill(driver, **values) -> None:
    """Type into the controls as a keyboard user would (select-all, then the new text)."""
    for element_id, text in values.items():
        element = driver.find_element(By.ID, element_id)
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(str(text))


def submit_with_the_keyboard(driver) -> None:
    """Tab from the seed field to the Generate button, then Enter: the page works without a mouse."""
    driver.find_element(By.ID, "seed").click()
    for _ in range(3):
        if driver.switch_to.active_element.get_attribute("id") == "generate":
            break
        driver.switch_to.active_element.send_keys(Keys.TAB)
    assert driver.switch_to.active_element.get_attribute("id") == "generate", "Tab does not reach Generate"
    driver.switch_to.active_element.send_keys(Keys.ENTER)


def result_images(driver, count: int) -> list[str]:
    """The base64 PNGs of the current result's <img> data URLs, once ``count`` are shown."""
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#current img")) == count, f"{count} images")
    return [img.get_attribute("src").removeprefix("data:image/png;base64,")
            for img in driver.find_elements(By.CSS_SELECTOR, "#current img")]


def test_page_is_served_open_and_fetches_nothing_from_elsewhere(base):
    with httpx.Client(base_url=base) as http:
        for path in ("/", MODEL_ROUTE):
            page = http.get(path)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), path
            assert "connect-src 'self'" in page.headers["content-security-policy"]
            assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:)?//", page.text), "an external resource"
        assert http.get(MODEL_ROUTE + "v1/models").status_code == 401  # the page is open, the API is not


def test_digit_generated_from_the_keyboard_streams_to_the_end_and_is_the_apis_image(base, browser):
    open_page(browser, base + "/")
    fill(browser, **{"class": "3", "n": 4, "steps": 25, "seed": 7})
    submit_with_the_keyboard(browser)
    images = result_images(browser, 4)
    progress = browser.find_element(By.ID, "progress")
    assert progress.get_attribute("max") == "25" and progress.get_attribute("value") == "25"  # the last event came
    sent = json.loads(browser.find_element(By.CSS_SELECTOR, "#current .request-body").get_attribute("textContent"))
    card = httpx.get(base + "/v1/models/digits-s", timeout=10).json()
    offered = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#sampler option")]
    assert offered == card["samplers"] and sent["sampler"] == card["defaults"]["sampler"]  # from the card
    assert {k: sent[k] for k in ("model", "prompt", "n", "num_inference_steps", "seed")} == \
        {"model": "digits-s", "prompt": "3", "n": 4, "num_inference_steps": 25, "seed": 7}
    api = httpx.post(base + "/v1/images/generations", json=sent, timeout=60).json()
    assert images == [d["b64_json"] for d in api["data"]]  # the same PNG bytes
    if os.environ.get("DIT_PLAYGROUND_SCREENSHOT"):
        browser.save_screenshot(os.environ["DIT_PLAYGROUND_SCREENSHOT"])

    browser.find_element(By.CSS_SELECTOR, "#current button.again").click()  # same seed again: same images
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery > li")) == 2, "a second gallery entry")
    assert result_images(browser, 4) == images


def current_seed(driver) -> int:
    """The seed the current result shows (from the answer) and would send again (its request body)."""
    shown = re.search(r"seed (\d+) ·", driver.find_element(By.CSS_SELECTOR, "#current .meta").text)[1]
    sent = json.loads(driver.find_element(By.CSS_SELECTOR, "#current .request-body").get_attribute("textContent"))
    assert sent["seed"] == int(shown), "the page sends another seed than it shows"
    return sent["seed"]


def test_a_random_seed_sent_again_draws_the_same_images(base, browser):
    open_page(browser, base + "/")
    fill(browser, **{"class": "4", "n": 2, "steps": 5})
    assert browser.find_element(By.ID, "seed").get_attribute("value") == ""  # no seed: the engine draws one
    submit_with_the_keyboard(browser)
    images = result_images(browser, 2)
    seed = current_seed(browser)
    browser.find_element(By.CSS_SELECTOR, "#current button.again").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery > li")) == 2, "a second gallery entry")
    assert result_images(browser, 2) == images  # the same PNG bytes
    assert current_seed(browser) == seed


def test_a_typed_seed_past_2_53_goes_out_and_comes_back_unrounded(base, browser):
    seed = 2 ** 62 + 1  # a JavaScript number holds 2**62, not this
    open_page(browser, base + "/")
    fill(browser, **{"class": "6", "n": 1, "steps": 5, "seed": seed})
    submit_with_the_keyboard(browser)
    [image] = result_images(browser, 1)
    assert current_seed(browser) == seed
    sent = json.loads(browser.find_element(By.CSS_SELECTOR, "#current .request-body").get_attribute("textContent"))
    api = {s: httpx.post(base + "/v1/images/generations", json={**sent, "seed": s}, timeout=60).json()
           for s in (seed, seed - 1)}
    assert image == api[seed]["data"][0]["b64_json"]  # the server drew with the very seed typed
    assert image != api[seed - 1]["data"][0]["b64_json"]  # and a seed off by one would have shown


@pytest.mark.parametrize("values, param, needle", [
    ({"steps": 61}, "num_inference_steps", "[1, 60]"),
    ({"class": "eleven"}, "prompt", "'9'"),  # the shipped models' classes are named '0'..'9'
])
def test_a_bad_field_is_shown_naming_it(base, browser, values, param, needle):
    open_page(browser, base + "/")
    fill(browser, **values)
    submit_with_the_keyboard(browser)
    error = wait(browser, lambda d: d.find_element(By.ID, "error").text or None, "the error message")
    assert error.startswith("400 invalid_request_error") and f"field: {param}" in error and needle in error, error
    control = next(iter(values))
    assert browser.find_element(By.ID, control).get_attribute("aria-invalid") == "true"


def test_a_student_offers_its_step_counts_and_guidance_range_and_draws_the_apis_image(base, browser):
    open_page(browser, base + "/")
    Select(browser.find_element(By.ID, "model")).select_by_value("digits-s-4step")
    card = httpx.get(base + "/v1/models/digits-s-4step", timeout=10).json()
    steps = browser.find_element(By.ID, "steps-choice")
    assert steps.is_displayed() and not browser.find_element(By.ID, "steps").is_displayed()
    assert [o.get_attribute("value") for o in Select(steps).options] == [str(n) for n in card["step_counts"]]
    assert card["step_counts"] == [1, 2, 4, 8] and steps.get_attribute("value") == "4"  # its default
    assert float(browser.find_element(By.ID, "guidance").get_attribute("max")) == card["max_guidance_scale"] == 4.0
    assert "one row" in browser.find_element(By.ID, "guidance-hint").text
    Select(steps).select_by_value("2")
    fill(browser, **{"class": "8", "n": 2, "seed": 3})
    submit_with_the_keyboard(browser)
    images = result_images(browser, 2)
    sent = json.loads(browser.find_element(By.CSS_SELECTOR, "#current .request-body").get_attribute("textContent"))
    assert sent["num_inference_steps"] == 2 and sent["sampler"] == "consistency"
    api = httpx.post(base + "/v1/images/generations", json=sent, timeout=60).json()
    assert images == [d["b64_json"] for d in api["data"]]


def test_every_control_has_a_label_and_the_page_reflows_at_200_percent_zoom(base, browser):
    open_page(browser, base + "/")
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button, progress')]
          .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                       && !(e.tagName === 'BUTTON' && e.textContent.trim()))
          .map(e => e.id || e.outerHTML.slice(0, 80));""")
    assert unlabelled == []
    size = browser.get_window_size()
    try:  # a 640-pixel-wide viewport is a 1280-pixel screen at 200% zoom
        browser.set_window_size(640, 900)
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{overflow} px of horizontal scrolling at 200% zoom"
    finally:
        browser.set_window_size(size["width"], size["height"])


def test_on_a_models_own_route_with_keys_on_the_page_asks_for_a_key_and_sends_it(base, browser):
    browser.get(base + MODEL_ROUTE)
    key = wait(browser, lambda d: d.find_element(By.ID, "api-key") if d.find_element(By.ID, "auth").is_displayed()
               else None, "the API key prompt")
    key.send_keys("sk-wrong", Keys.ENTER)
    error = wait(browser, lambda d: d.find_element(By.ID, "error").text or None, "the 401")
    assert error.startswith("401 authentication_error") and "invalid API key" in error, error
    key.send_keys(Keys.CONTROL, "a")
    key.send_keys(KEY, Keys.ENTER)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"), "the model list with the key")
    fill(browser, **{"class": "5", "n": 1, "steps": 5, "seed": 1})
    submit_with_the_keyboard(browser)
    [image] = result_images(browser, 1)
    sent = json.loads(browser.find_element(By.CSS_SELECTOR, "#current .request-body").get_attribute("textContent"))
    api = httpx.post(base + MODEL_ROUTE + "v1/images/generations", json=sent, timeout=60,
                     headers={"Authorization": f"Bearer {KEY}"}).json()
    assert image == api["data"][0]["b64_json"]
    stored = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]  # the key lives in the tab's memory only
