"""lmsd's dashboard in a real browser (Debian's chromium, headless, through selenium and
chromedriver): it asks for the key, shows a model loaded with lmsd-ctl without a reload, shows a
task's events as they happen, and its Unload button takes effect in lmsd. Saves a screenshot.
Run by tests/e2e/dashboard.rs.

Usage: check.py URL KEY CTL SOCKET MODEL SCREENSHOT JOB_FILE
"""

import json
import subprocess
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as seen
from selenium.webdriver.support.ui import WebDriverWait

url, key, ctl, socket, model, screenshot, job = sys.argv[1:8]


def lmsd_ctl(*args):
    out = subprocess.run([ctl, "--socket", socket, "--json", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


options = webdriver.ChromeOptions()
for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"]:
    options.add_argument(flag)
browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
wait = WebDriverWait(browser, 20)
try:
    browser.get(url)
    # With [http] api_keys the page asks for a key once.
    field = wait.until(seen.visibility_of_element_located((By.ID, "key-input")))
    field.send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#key button").click()
    wait.until(seen.text_to_be_present_in_element((By.ID, "engine"), "reachable"))
    wait.until(seen.text_to_be_present_in_element((By.ID, "live"), "live"))

    # A model loaded from the command line appears without a reload.
    lmsd_ctl("load", model)
    wait.until(seen.text_to_be_present_in_element((By.ID, "instances"), model))
    wait.until(seen.text_to_be_present_in_element((By.ID, "events"), f"loaded {model}"))

    # A task's events show up as they happen.
    chat = lmsd_ctl("chat", model, "Say hello")
    wait.until(seen.text_to_be_present_in_element((By.ID, "events"), f"task {chat['task_id']} finished: ok"))
    # A labelled job and a contract fill the batch and pass-rate panels; the ledger (written in
    # batches) reaches the savings panel.
    lmsd_ctl("chat", model, "Label: it crashes", "--choices", "bug,feature")
    lmsd_ctl("batch", "submit", job, "--choices", "bug,feature", "--wait")
    wait.until(seen.text_to_be_present_in_element((By.ID, "batches"), "completed"))
    wait.until(seen.text_to_be_present_in_element((By.ID, "fitness"), model))
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: not b.find_element(By.ID, "savings-text").text.startswith("0 tasks"))
    browser.save_screenshot(screenshot)

    # Unload from the page takes effect in lmsd.
    unload = wait.until(seen.element_to_be_clickable((By.XPATH, f"//tbody[@id='instances']//tr[td[1]='{model}']//button[text()='Unload']")))
    unload.click()
    wait.until(lambda _: not any(i["model"] == model for i in lmsd_ctl("status")["instances"]))
    wait.until(lambda b: model not in b.find_element(By.ID, "instances").text)
finally:
    browser.quit()

print("dashboard: ok")
