"""The two UIs that ``finetune-flows up`` serves, driven in headless Chromium (Selenium).

A custom run of ``sentiment-finetune`` is started from the Prefect UI's form with one field
changed, the worker runs it to Completed, and the MLflow UI shows the version it registered with
its ``champion`` alias and its metrics. The deployment is first pointed at a tiny BERT and 288
training rows (through the Prefect API, as an operator would with *Edit*), so the run takes
seconds, not minutes. Screenshots go to ``tests/output/browser/``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from finetune_flows.flows.cli.services import ServiceRecord
from tests.conftest import CHROMIUM, NEGATIVE, POSITIVE, write_tsv

SCREENSHOTS = Path(__file__).resolve().parent / "output" / "browser"
RUN_NAME = "browser-custom-run"
CHAMPION = "//span[starts-with(., '@') and contains(., 'champion')]"  # the alias tag reads "@ champion"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs /usr/bin/chromium (bash .ci/setup installs it)"),
]


@pytest.fixture(scope="module")
def tiny_deployment(services: dict[str, str], tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Point ``sentiment-finetune`` at the tiny model and small files; returns the Prefect URL."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import DeploymentUpdate

    folder = tmp_path_factory.mktemp("browser-data")
    rows = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
    suffixes = ["indeed", "overall", "really", "truly", "honestly", "frankly", "clearly", "simply", "surely",
                "plainly", "certainly", "obviously"]  # fmt: skip
    train = write_tsv(folder / "train.tsv", [(f"{t} {s}", lab) for s in suffixes for t, lab in rows])
    dev = write_tsv(folder / "dev.tsv", [(f"{t} {s}", lab) for s in ("in the end", "all in all") for t, lab in rows])
    config = {
        "scenario": "sentiment",
        "model": {"source": str(tiny_model_dir), "max_length": 32},
        "data": {"train_path": str(train), "eval_path": str(dev)},
        "training": {"epochs": 1.0, "batch_size": 16, "learning_rate": 5e-3, "eval_every_steps": 5},
    }
    prefect_url = record(services).prefect_url
    with SyncPrefectClient(f"{prefect_url}/api") as client:
        deployment = client.read_deployment_by_name("finetune/sentiment-finetune")
        client.update_deployment(deployment.id, DeploymentUpdate(parameters={"config": config}))
    return prefect_url


def record(env: dict[str, str]) -> ServiceRecord:
    path = Path(env["FINETUNE_FLOWS_STATE_DIR"]) / "services" / "services.json"
    return ServiceRecord.model_validate_json(path.read_text(encoding="utf-8"))


def screenshot(driver: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def form_input(driver: Any, label: str) -> Any:
    """The input of the Prefect schema-form field labelled ``label`` (nested models render as fieldsets)."""
    from selenium.webdriver.common.by import By

    prop = "contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')"
    xpath = f"//span[normalize-space()='{label}']/ancestor::div[{prop}][1]//input"
    element = driver.find_element(By.XPATH, xpath)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    return element


def type_into(element: Any, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(text)


def custom_run_from_prefect_ui(driver: Any, prefect_url: str) -> None:
    """Deployments > sentiment-finetune > Run > Custom run; epochs 2; submit; wait for Completed."""
    from prefect.client.orchestration import SyncPrefectClient
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    # The deployments list pages by 10 and there are more than 10: find the deployment with the list's search box.
    driver.get(f"{prefect_url}/deployments")
    search = wait.until(ec.element_to_be_clickable((By.XPATH, "//input[@placeholder='Search deployments...']")))
    search.send_keys("sentiment-finetune")
    wait.until(ec.element_to_be_clickable((By.XPATH, "//a[normalize-space()='sentiment-finetune']"))).click()
    with SyncPrefectClient(f"{prefect_url}/api") as client:
        deployment_id = client.read_deployment_by_name("finetune/sentiment-finetune").id
    wait.until(ec.url_contains(str(deployment_id)))
    wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Run']"))).click()
    wait.until(ec.element_to_be_clickable((By.XPATH, "//*[normalize-space()='Custom run']"))).click()
    wait.until(ec.presence_of_element_located((By.XPATH, "//span[normalize-space()='Epochs (Optional)']")))
    run_name = driver.find_element(By.XPATH, "//*[normalize-space()='Run Name']/following::input[1]")
    type_into(run_name, RUN_NAME)
    assert run_name.get_attribute("value") == RUN_NAME
    epochs = form_input(driver, "Epochs (Optional)")
    assert epochs.get_attribute("value") == "1"  # the deployment's parameters fill the form
    type_into(epochs, "2")
    assert epochs.get_attribute("value") == "2"
    screenshot(driver, "1-prefect-custom-run-form")
    # After Submit the UI shows the deployment's runs (the new one as "Next Run" or in the list) and a toast
    # "<name> scheduled to start now" with a "View run" button. Under load Prefect's SQLite store can be busy:
    # create_flow_run answers 503 (retryable), the UI toasts "Something went wrong", and we submit once more.
    link = f"//a[normalize-space()='{RUN_NAME}'] | //button[normalize-space()='View run']"
    oops = "//*[contains(text(), 'Something went wrong')]"
    for attempt in (1, 2):
        submit = driver.find_element(By.XPATH, "//button[normalize-space()='Submit']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", submit)
        driver.execute_script("arguments[0].click()", submit)  # not through an error toast over it
        WebDriverWait(driver, 120).until(
            ec.any_of(ec.element_to_be_clickable((By.XPATH, link)), ec.presence_of_element_located((By.XPATH, oops)))
        )
        if not driver.find_elements(By.XPATH, oops) or "/run" not in driver.current_url or attempt == 2:
            break
        console = [entry["message"] for entry in driver.get_log("browser")]
        print(f"Prefect UI error on submit ({screenshot(driver, 'submit-error')}; console {console}); submitting again")
    # A toast may cover the link for a moment, so the click goes through the element itself.
    driver.execute_script("arguments[0].click()", wait.until(ec.element_to_be_clickable((By.XPATH, link))))
    heading = f"//header[contains(@class, 'page-heading-flow-run')][.//span[normalize-space()='{RUN_NAME}']]"
    badge = f"{heading}//span[contains(@class, 'state-badge')]"
    final = {"Completed", "Failed", "Crashed", "Cancelled"}
    state = WebDriverWait(driver, 600, poll_frequency=2, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: next((e.text for e in d.find_elements(By.XPATH, badge) if e.text in final), False)
    )
    screenshot(driver, "2-prefect-flow-run")
    assert state == "Completed", f"flow run {RUN_NAME} ended {state}: {driver.current_url}"


def check_mlflow_ui(driver: Any, mlflow_url: str, version: str, run_id: str) -> None:
    """Registered Models > sentiment: the version with @champion; its page: the alias and eval metrics;
    its source run: the confusion matrix among the artifacts."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(f"{mlflow_url}/#/models")
    model = "//a[normalize-space()='sentiment']"
    wait.until(ec.element_to_be_clickable((By.XPATH, model)))
    try:  # a first visit may show a modal introducing the (already enabled) new model registry UI
        intro = "//div[@role='dialog']//button[normalize-space()='Try it now']"
        WebDriverWait(driver, 5).until(ec.element_to_be_clickable((By.XPATH, intro))).click()
        wait.until(ec.invisibility_of_element_located((By.XPATH, "//div[@role='dialog']")))
    except TimeoutException:
        pass
    wait.until(ec.element_to_be_clickable((By.XPATH, model))).click()
    # The model's page: its versions table, where the version carries the alias.
    row = f"//*[@role='row'][.//a[normalize-space()='Version {version}']]"
    wait.until(ec.presence_of_element_located((By.XPATH, "//h2[starts-with(normalize-space(), 'sentiment')]")))
    alias = wait.until(ec.presence_of_element_located((By.XPATH, f"{row}{CHAMPION}")))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", alias)
    screenshot(driver, "3-mlflow-registered-model")
    wait.until(ec.element_to_be_clickable((By.XPATH, f"//a[normalize-space()='Version {version}']"))).click()
    wait.until(ec.presence_of_element_located((By.XPATH, f"//h2[normalize-space()='Version {version}']")))
    assert driver.find_elements(By.XPATH, CHAMPION)
    accuracy = wait.until(
        ec.presence_of_element_located((By.XPATH, "//td[normalize-space()='eval.accuracy']/following-sibling::td[1]"))
    )
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", accuracy)
    assert re.fullmatch(r"0\.\d+|1\.0+", accuracy.text.strip()), accuracy.text
    screenshot(driver, "4-mlflow-model-version")
    # The version's source run: its artifacts, written by the worker's flow run, served by the MLflow server.
    wait.until(ec.element_to_be_clickable((By.XPATH, f"//a[contains(@href, '/runs/{run_id}')]"))).click()
    artifacts_tab = "//button[@role='tab' and normalize-space()='Artifacts']"
    wait.until(ec.element_to_be_clickable((By.XPATH, artifacts_tab))).click()
    wait.until(ec.element_to_be_clickable((By.XPATH, "//*[@artifact-name='evaluation']"))).click()
    matrix = "//*[contains(@artifact-name, 'confusion_matrix.png')]"
    wait.until(ec.element_to_be_clickable((By.XPATH, matrix))).click()
    preview = "//*[normalize-space()='evaluation/confusion_matrix.png']/following::img[1]"
    wait.until(ec.visibility_of_element_located((By.XPATH, preview)))
    screenshot(driver, "5-mlflow-run-artifacts")


def test_custom_run_from_prefect_ui_lands_in_mlflow_ui(
    browser: Any, tiny_deployment: str, services: dict[str, str]
) -> None:
    import mlflow
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    try:
        custom_run_from_prefect_ui(browser, tiny_deployment)
    except Exception:
        screenshot(browser, "error-prefect")
        raise
    with SyncPrefectClient(f"{tiny_deployment}/api") as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[RUN_NAME])))
    assert [(r.state_name, r.parameters["config"]["training"]["epochs"]) for r in runs] == [("Completed", 2)]

    mlflow_url = record(services).mlflow_url
    champion = mlflow.MlflowClient(mlflow_url).get_model_version_by_alias("sentiment", "champion")
    assert json.loads(mlflow.MlflowClient(mlflow_url).get_run(champion.run_id).data.params["training.epochs"]) == 2
    check_mlflow_ui(browser, mlflow_url, champion.version, champion.run_id)
